/* taxiway's guest agent: PID 1 of a micro-VM (after the init script's mounts).
 *
 * It reaps every zombie, runs the machine's main process and `machines exec`
 * processes (chroot /newroot, chdir, setgroups/setgid/setuid, env, execve),
 * and speaks one framed, multiplexed protocol with the host over the
 * virtio-serial port named "taxiway.agent":
 *
 *     frame = type (1 byte) | channel (u32, big endian) | length (u32, big endian) | payload
 *
 * Channel 0 is the main process; the host opens others for exec. Payloads:
 * OPEN: NUL-terminated "key=value" items (arg=, env= repeated; cwd, uid,
 * gid, groups=1,2, tty, rows, cols, stdin); STDIN/STDOUT/STDERR: bytes;
 * EXIT: i32 code, i32 signal; SIGNAL: i32; RESIZE: u16 rows, u16 cols;
 * ERROR: text; STARTED, READY, STDIN_EOF: empty; ACK: u32 bytes of stdin
 * written to the process (the host keeps at most WINDOW bytes unacknowledged
 * per channel, so one slow reader never makes the agent stop reading the port).
 *
 * Output is read from a process only while the queue to the port is below
 * OUTQ_MAX, so a slow host slows writers down instead of growing memory.
 * When the main process exits the agent sends its EXIT, prints the exit mark
 * on the console too (the host's fallback), kills what is left, syncs,
 * unmounts and powers off.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

enum {
    T_OPEN = 1, T_STDIN = 2, T_STDIN_EOF = 3, T_STDOUT = 4, T_STDERR = 5, T_EXIT = 6, T_SIGNAL = 7,
    T_RESIZE = 8, T_STARTED = 9, T_ERROR = 10, T_READY = 11, T_ACK = 12,
};
#define HDR 9
#define MAXPAY (1 << 20)
#define MAXCH 256
#define OUTQ_MAX (1 << 20)
#define CHUNK 32768
#define ROOT "/newroot"
#define EXIT_MARK "@@TAXIWAY-EXIT@@"

struct buf { char *p; size_t off, len, cap; };

struct chan {
    int used;
    uint32_t id;
    pid_t pid;
    int tty;
    int in_fd, out_fd, err_fd;  /* with a tty, in_fd == out_fd == the pty master; err_fd = -1 */
    int eof_pending;            /* STDIN_EOF seen: close in_fd once the buffer is written */
    int exited, status;
    struct buf in;
};

static struct chan chans[MAXCH];
static struct buf outq, inq;
static int port = -1;
static int port_hup;

static void die(const char *msg) {
    printf(EXIT_MARK " 125 agent: %s\n", msg);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static void buf_add(struct buf *b, const void *data, size_t n) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {
            memmove(b->p, b->p + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 65536;
            while (cap < b->len + n) cap *= 2;
            char *p = realloc(b->p, cap);
            if (!p) die("out of memory");
            b->p = p;
            b->cap = cap;
        }
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static size_t buf_size(struct buf *b) { return b->len - b->off; }

static void send_frame(int type, uint32_t ch, const void *data, uint32_t n) {
    unsigned char h[HDR] = {(unsigned char)type, ch >> 24, ch >> 16, ch >> 8, ch, n >> 24, n >> 16, n >> 8, n};
    buf_add(&outq, h, HDR);
    if (n) buf_add(&outq, data, n);
}

static void send_exit(uint32_t ch, int code, int sig) {
    unsigned char p[8] = {code >> 24, code >> 16, code >> 8, code, sig >> 24, sig >> 16, sig >> 8, sig};
    send_frame(T_EXIT, ch, p, 8);
}

static void send_u32(int type, uint32_t ch, uint32_t v) {
    unsigned char p[4] = {v >> 24, v >> 16, v >> 8, v};
    send_frame(type, ch, p, 4);
}

static int flush_port(void) {
    while (buf_size(&outq)) {
        ssize_t w = write(port, outq.p + outq.off, buf_size(&outq));
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            outq.off = outq.len = 0;  /* the host is gone: drop what it cannot read */
            return -1;
        }
        outq.off += w;
    }
    return 0;
}

static struct chan *find_chan(uint32_t id) {
    for (int i = 0; i < MAXCH; i++)
        if (chans[i].used && chans[i].id == id) return &chans[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void free_chan(struct chan *c) {
    if (c->in_fd == c->out_fd) c->out_fd = -1;
    close_fd(&c->in_fd);
    close_fd(&c->out_fd);
    close_fd(&c->err_fd);
    free(c->in.p);
    memset(c, 0, sizeof *c);
    c->in_fd = c->out_fd = c->err_fd = -1;
}

/* -- spawning ----------------------------------------------------------------------------- */

struct spec {
    char *argv[256];
    char *envp[512];
    int argc, envc;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups;
    int tty, rows, cols, keep_stdin;
};

static void parse_spec(char *p, uint32_t n, struct spec *s) {
    memset(s, 0, sizeof *s);
    s->cwd = "/";
    s->rows = 24;
    s->cols = 80;
    char *end = p + n;
    while (p < end) {
        char *item = p;
        size_t len = strnlen(p, end - p);
        if (p + len >= end) break;  /* not NUL-terminated: ignore the rest */
        p += len + 1;
        if (!strncmp(item, "arg=", 4) && s->argc < 255) s->argv[s->argc++] = item + 4;
        else if (!strncmp(item, "env=", 4) && s->envc < 511) s->envp[s->envc++] = item + 4;
        else if (!strncmp(item, "cwd=", 4)) s->cwd = item + 4;
        else if (!strncmp(item, "uid=", 4)) s->uid = strtoul(item + 4, NULL, 10);
        else if (!strncmp(item, "gid=", 4)) s->gid = strtoul(item + 4, NULL, 10);
        else if (!strncmp(item, "tty=", 4)) s->tty = atoi(item + 4);
        else if (!strncmp(item, "rows=", 5)) s->rows = atoi(item + 5);
        else if (!strncmp(item, "cols=", 5)) s->cols = atoi(item + 5);
        else if (!strncmp(item, "stdin=", 6)) s->keep_stdin = atoi(item + 6);
        else if (!strncmp(item, "groups=", 7)) {
            char *q = item + 7;
            while (*q && s->ngroups < 64) {
                s->groups[s->ngroups++] = strtoul(q, &q, 10);
                if (*q == ',') q++;
                else break;
            }
        }
    }
    s->argv[s->argc] = NULL;
    s->envp[s->envc] = NULL;
}

static const char *env_path(struct spec *s) {
    for (int i = 0; i < s->envc; i++)
        if (!strncmp(s->envp[i], "PATH=", 5)) return s->envp[i] + 5;
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

static void child_fail(int ep, const char *fmt, const char *arg) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, fmt, arg);
    if (write(ep, msg, n) < 0) {}
    _exit(127);
}

/* In the child: never returns. */
static void child(struct spec *s, int ep, int in, int out, int err, const char *slave) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int i = 1; i < 32; i++) signal(i, SIG_DFL);
    setsid();
    if (slave) {
        int t = open(slave, O_RDWR);
        if (t < 0) child_fail(ep, "cannot open the terminal %s", slave);
        ioctl(t, TIOCSCTTY, 0);
        if (fchown(t, s->uid, -1) < 0) {}
        in = out = err = t;
    } else if (in < 0) {
        in = open("/dev/null", O_RDONLY);
    }
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) child_fail(ep, "%s", "dup2 failed");
    if (chroot(ROOT) < 0) child_fail(ep, "%s", "cannot enter the machine's root");
    if (chdir(s->cwd) < 0 && chdir("/") < 0) child_fail(ep, "cannot change to %s", s->cwd);
    if (setgroups(s->ngroups, s->groups) < 0 || setgid(s->gid) < 0 || setuid(s->uid) < 0)
        child_fail(ep, "%s", "cannot switch to the machine's user");
    if (s->argc == 0) child_fail(ep, "%s", "no command given");
    const char *cmd = s->argv[0];
    if (strchr(cmd, '/')) {
        execve(cmd, s->argv, s->envp);
    } else {
        char path[4096];
        const char *p = env_path(s);
        while (*p) {
            const char *e = strchrnul(p, ':');
            int n = snprintf(path, sizeof path, "%.*s/%s", (int)(e - p), e == p ? "." : p, cmd);
            if (n > 0 && n < (int)sizeof path) {
                struct stat st;
                if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0) {
                    execve(path, s->argv, s->envp);
                    break;
                }
            }
            p = *e ? e + 1 : e;
        }
    }
    child_fail(ep, "command '%s' not found in the machine (PATH and file checked)", cmd);
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void open_chan(uint32_t id, char *payload, uint32_t n) {
    struct spec s;
    struct chan *c = NULL;
    if (find_chan(id)) {
        send_frame(T_ERROR, id, "channel already open", 20);
        send_exit(id, 127, 0);
        return;
    }
    for (int i = 0; i < MAXCH && !c; i++)
        if (!chans[i].used) c = &chans[i];
    if (!c) {
        send_frame(T_ERROR, id, "too many channels", 17);
        send_exit(id, 127, 0);
        return;
    }
    parse_spec(payload, n, &s);
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, ep[2];
    int master = -1;
    char slave[64];
    if (pipe2(ep, O_CLOEXEC) < 0) goto fail;
    if (s.tty) {
        master = open(ROOT "/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
        int unlock = 0, num = 0;
        if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) < 0 || ioctl(master, TIOCGPTN, &num) < 0) goto fail;
        snprintf(slave, sizeof slave, ROOT "/dev/pts/%d", num);
        struct winsize ws = {.ws_row = s.rows, .ws_col = s.cols};
        ioctl(master, TIOCSWINSZ, &ws);
    } else {
        if ((s.keep_stdin && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0)
            goto fail;
    }
    pid_t pid = fork();
    if (pid < 0) goto fail;
    if (pid == 0) {
        close(ep[0]);
        child(&s, ep[1], in[0], out[1], err[1], s.tty ? slave : NULL);
    }
    close(ep[1]);
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    c->used = 1;
    c->id = id;
    c->pid = pid;
    c->tty = s.tty;
    if (s.tty) {
        c->in_fd = c->out_fd = master;
        c->err_fd = -1;
    } else {
        c->in_fd = in[1];
        c->out_fd = out[0];
        c->err_fd = err[0];
    }
    for (int *fd = &c->in_fd; fd <= &c->err_fd; fd++)
        if (*fd >= 0) set_nonblock(*fd);
    char msg[512];
    ssize_t m;
    do m = read(ep[0], msg, sizeof msg); while (m < 0 && errno == EINTR);
    close(ep[0]);
    if (m > 0) {
        send_frame(T_ERROR, id, msg, m);  /* the EXIT follows when the child is reaped */
    } else {
        send_frame(T_STARTED, id, NULL, 0);
        if (id == 0) printf("@@TAXIWAY-START@@\n"), fflush(stdout);
    }
    return;
fail:;
    char e[128];
    int k = snprintf(e, sizeof e, "cannot start the process: %s", strerror(errno));
    send_frame(T_ERROR, id, e, k);
    send_exit(id, 127, 0);
    int fds[] = {in[0], in[1], out[0], out[1], err[0], err[1], master};
    for (unsigned i = 0; i < sizeof fds / sizeof *fds; i++)
        if (fds[i] >= 0) close(fds[i]);
}

/* -- frames from the host ------------------------------------------------------------------- */

static void handle_frame(int type, uint32_t id, char *p, uint32_t n) {
    if (type == T_OPEN) {
        open_chan(id, p, n);
        return;
    }
    struct chan *c = find_chan(id);
    if (!c) return;
    switch (type) {
    case T_STDIN:
        if (c->in_fd >= 0 && !c->eof_pending) buf_add(&c->in, p, n);
        break;
    case T_STDIN_EOF:
        if (c->tty) {
            if (c->in_fd >= 0) buf_add(&c->in, "\x04", 1);  /* ^D: what a terminal's EOF is */
        } else {
            c->eof_pending = 1;
        }
        break;
    case T_SIGNAL:
        if (n >= 4 && c->pid > 0 && !c->exited) {
            int sig = (int)((uint32_t)(unsigned char)p[0] << 24 | (unsigned char)p[1] << 16 |
                            (unsigned char)p[2] << 8 | (unsigned char)p[3]);
            kill(c->pid, sig);
        }
        break;
    case T_RESIZE:
        if (n >= 4 && c->tty && c->in_fd >= 0) {
            struct winsize ws = {.ws_row = (unsigned char)p[0] << 8 | (unsigned char)p[1],
                                 .ws_col = (unsigned char)p[2] << 8 | (unsigned char)p[3]};
            ioctl(c->in_fd, TIOCSWINSZ, &ws);
        }
        break;
    }
}

static void parse_inq(void) {
    while (buf_size(&inq) >= HDR) {
        unsigned char *h = (unsigned char *)inq.p + inq.off;
        uint32_t id = (uint32_t)h[1] << 24 | h[2] << 16 | h[3] << 8 | h[4];
        uint32_t n = (uint32_t)h[5] << 24 | h[6] << 16 | h[7] << 8 | h[8];
        if (n > MAXPAY) die("bad frame from the host");
        if (buf_size(&inq) < HDR + n) return;
        handle_frame(h[0], id, inq.p + inq.off + HDR, n);
        inq.off += HDR + n;
    }
}

/* -- output ---------------------------------------------------------------------------------- */

/* Read what a process wrote; returns 0 at EOF or error. */
static int pump(struct chan *c, int *fd, int type) {
    char b[CHUNK];
    ssize_t n = read(*fd, b, sizeof b);
    if (n > 0) {
        send_frame(type, c->id, b, n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 1;
    if (c->tty) {  /* EIO on the master: every holder of the terminal is gone */
        if (c->in_fd == *fd) c->in_fd = -1;
    }
    close_fd(fd);
    return 0;
}

static void drain(struct chan *c) {
    size_t budget = 4 << 20;  /* a background child may keep writing: do not wait for it forever */
    while ((c->out_fd >= 0 || c->err_fd >= 0) && budget) {
        size_t before = buf_size(&outq);
        if (c->out_fd >= 0) pump(c, &c->out_fd, T_STDOUT);
        if (c->err_fd >= 0) pump(c, &c->err_fd, T_STDERR);
        size_t got = buf_size(&outq) - before;
        if (!got) break;
        budget = got > budget ? 0 : budget - got;
    }
}

static void finish(struct chan *c) {
    drain(c);
    int code, sig = 0;
    if (WIFSIGNALED(c->status)) {
        sig = WTERMSIG(c->status);
        code = 128 + sig;
    } else {
        code = WEXITSTATUS(c->status);
    }
    send_exit(c->id, code, sig);
    free_chan(c);
}

static void power_off(int code) {
    /* Give the host the last frames (up to 3 s), then leave the fallback mark on the console. */
    set_nonblock(port);
    for (int i = 0; i < 300 && buf_size(&outq) && !port_hup; i++) {
        struct pollfd p = {port, POLLOUT, 0};
        poll(&p, 1, 10);
        if (p.revents & (POLLHUP | POLLERR)) break;
        if (flush_port() < 0) break;
    }
    kill(-1, SIGKILL);
    printf(EXIT_MARK " %d\n", code);
    fflush(stdout);
    sync();
    /* unmount what lies under the root, deepest first */
    char mps[64][256];
    int n = 0;
    FILE *f = fopen("/proc/mounts", "r");
    if (f) {
        char line[1024];
        while (fgets(line, sizeof line, f) && n < 64) {
            char dev[256], mp[256];
            if (sscanf(line, "%255s %255s", dev, mp) == 2 && !strncmp(mp, ROOT, strlen(ROOT)))
                snprintf(mps[n++], sizeof mps[0], "%s", mp);
        }
        fclose(f);
    }
    while (n--) umount2(mps[n], MNT_DETACH);
    sync();
    reboot(RB_POWER_OFF);
    _exit(0);
}

static int find_port(void) {
    for (int tries = 0; tries < 500; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[512], name[64] = {0};
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            ssize_t k = read(fd, name, sizeof name - 1);
            close(fd);
            if (k > 0 && !strncmp(name, "taxiway.agent", 13)) {
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                int p = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
                if (p >= 0) {
                    closedir(d);
                    return p;
                }
            }
        }
        if (d) closedir(d);
        usleep(10000);
    }
    return -1;
}

int main(void) {
    for (int i = 0; i < MAXCH; i++) chans[i].in_fd = chans[i].out_fd = chans[i].err_fd = -1;
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    port = find_port();
    if (port < 0) die("no virtio port named taxiway.agent");
    send_frame(T_READY, 0, NULL, 0);
    int main_done = 0, main_code = 0;
    for (;;) {
        struct pollfd pfd[2 + 3 * MAXCH];
        struct chan *owner[2 + 3 * MAXCH];
        int which[2 + 3 * MAXCH];
        int n = 0;
        pfd[n] = (struct pollfd){sfd, POLLIN, 0};
        owner[n++] = NULL;
        pfd[n] = (struct pollfd){port_hup ? -1 : port, (short)(POLLIN | (buf_size(&outq) ? POLLOUT : 0)), 0};
        owner[n++] = NULL;
        int room = buf_size(&outq) < OUTQ_MAX;
        for (int i = 0; i < MAXCH; i++) {
            struct chan *c = &chans[i];
            if (!c->used) continue;
            if (c->in_fd >= 0 && buf_size(&c->in)) {
                pfd[n] = (struct pollfd){c->in_fd, POLLOUT, 0};
                owner[n] = c, which[n++] = 0;
            }
            if (room && c->out_fd >= 0) {
                pfd[n] = (struct pollfd){c->out_fd, POLLIN, 0};
                owner[n] = c, which[n++] = 1;
            }
            if (room && c->err_fd >= 0) {
                pfd[n] = (struct pollfd){c->err_fd, POLLIN, 0};
                owner[n] = c, which[n++] = 2;
            }
        }
        int r = poll(pfd, n, port_hup ? 200 : -1);
        if (r < 0 && errno != EINTR) die("poll failed");
        if (port_hup) port_hup = 0;  /* try the port again: the host may be back */
        /* the port */
        if (pfd[1].revents & POLLOUT) flush_port();
        if (pfd[1].revents & POLLIN) {
            char b[CHUNK];
            ssize_t k = read(port, b, sizeof b);
            if (k > 0) {
                buf_add(&inq, b, k);
                parse_inq();
            } else if (k == 0) {
                port_hup = 1;
            }
        } else if (pfd[1].revents & (POLLHUP | POLLERR)) {
            port_hup = 1;
        }
        /* processes */
        for (int i = 2; i < n; i++) {
            struct chan *c = owner[i];
            if (!pfd[i].revents || !c->used) continue;
            if (which[i] == 0) {
                if (c->in_fd < 0) continue;
                ssize_t w = write(c->in_fd, c->in.p + c->in.off, buf_size(&c->in));
                if (w > 0) {
                    c->in.off += w;
                    send_u32(T_ACK, c->id, (uint32_t)w);
                } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                    c->in.off = c->in.len = 0;
                    if (!c->tty) close_fd(&c->in_fd);
                }
            } else if (which[i] == 1 && c->out_fd >= 0) {
                pump(c, &c->out_fd, T_STDOUT);
            } else if (which[i] == 2 && c->err_fd >= 0) {
                pump(c, &c->err_fd, T_STDERR);
            }
        }
        for (int i = 0; i < MAXCH; i++) {
            struct chan *c = &chans[i];
            if (c->used && !c->tty && c->eof_pending && !buf_size(&c->in)) close_fd(&c->in_fd);
        }
        /* reap */
        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) > 0) {}
        for (;;) {
            int st;
            pid_t pid = waitpid(-1, &st, WNOHANG);
            if (pid <= 0) break;
            for (int i = 0; i < MAXCH; i++) {
                struct chan *c = &chans[i];
                if (c->used && c->pid == pid && !c->exited) {
                    c->exited = 1;
                    c->status = st;
                    if (c->id == 0) {
                        main_done = 1;
                        main_code = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
                    }
                    finish(c);
                }
            }
        }
        flush_port();
        if (main_done) power_off(main_code);
    }
}
