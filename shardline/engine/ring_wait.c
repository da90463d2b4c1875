/* Preloaded into MLX runners on Linux (activities/ring_wait.py builds it): MLX's ring backend gives
 * each peer socket a thread that loops on non-blocking recv()/send() while a transfer is pending, so
 * a rank waiting for its peers (a pipeline rank while the others compute, an idle follower before a
 * header) keeps a core busy in the kernel. Here a recv() or send() that would block first sleeps in
 * ppoll() until the socket is ready, for at most NAP: the loop then runs as before (it also serves
 * the socket's other direction), a thousand times a second instead of millions. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

/* What a send queued on the same socket may wait, unseen, while its thread waits to receive. */
static const struct timespec NAP = {0, 1000000};

typedef ssize_t (*recv_fn)(int, void *, size_t, int);
typedef ssize_t (*send_fn)(int, const void *, size_t, int);

static void wait_until(int fd, short events) {
  int saved = errno;
  struct pollfd ready = {fd, events, 0};
  ppoll(&ready, 1, &NAP, NULL);
  errno = saved;
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
  static recv_fn real;
  if (!real) real = (recv_fn)dlsym(RTLD_NEXT, "recv");
  ssize_t got = real(fd, buf, len, flags);
  if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) wait_until(fd, POLLIN);
  return got;
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
  static send_fn real;
  if (!real) real = (send_fn)dlsym(RTLD_NEXT, "send");
  ssize_t sent = real(fd, buf, len, flags);
  if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) wait_until(fd, POLLOUT);
  return sent;
}
