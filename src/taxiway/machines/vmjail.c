/* tw-vmjail: runs a micro-VM's host-side file server (virtiofsd) with less privilege.
 *
 *     tw-vmjail KEEP [--bind DIR MNT [--ro]] -- PROGRAM ARGS...
 *
 * --bind: in a private mount namespace of its own, DIR (an absolute path
 * without symlinks, as the host resolved it when the machine was created) is
 * opened one component at a time with O_NOFOLLOW, so a component swapped for a
 * symlink since is refused, never followed; that very directory is bound on
 * MNT (through /proc/self/fd: no second lookup by name) nosuid, nodev and, with
 * --ro, read-only. PROGRAM serves MNT and so cannot open a device node that is
 * in the directory, nor write to a read-only volume even if the guest remounts
 * its side read-write.
 *
 * KEEP is a hex mask of the capabilities to leave in the bounding set; every
 * other one is dropped before exec, so PROGRAM (and all it forks) can never
 * hold them, whatever it does with its own capability sets. Then a seccomp
 * filter refuses, with EPERM, every way of giving a file the setuid or setgid
 * bit (chmod, fchmod, fchmodat, fchmodat2, open/openat/creat with O_CREAT or
 * O_TMPFILE, mknod, mknodat); refuses setting extended attributes (file
 * capabilities are the security.capability xattr); and refuses with ENOSYS the
 * calls whose arguments a filter cannot see (openat2, io_uring). A guest that
 * owns a volume therefore cannot leave a setuid-root program, a file with
 * capabilities, or (without CAP_MKNOD) a device node in the host directory.
 *
 * virtiofsd stacks its own filter on top; filters only ever narrow.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "tw-vmjail: unsupported architecture"
#endif

#define NR offsetof(struct seccomp_data, nr)
#define ARG(n) (offsetof(struct seccomp_data, args[n]))  /* the low 32 bits (little endian) */
#define SETID 06000
#ifndef __O_TMPFILE
#define __O_TMPFILE 020000000
#endif
#define RET_ERRNO(e) BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (e))

/* refuse `nr` when argument `mode` has the setuid or setgid bit (5 instructions) */
#define SETID_MODE(nr, mode)                                            \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR),                             \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 3),                    \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG(mode)),                      \
    BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, SETID, 0, 1),                  \
    RET_ERRNO(EPERM)

/* the same when it creates a file (O_CREAT or O_TMPFILE in argument `flags`; 7 instructions) */
#define SETID_CREATE(nr, flags, mode)                                   \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR),                             \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 5),                    \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG(flags)),                     \
    BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, O_CREAT | __O_TMPFILE, 0, 3),  \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG(mode)),                      \
    BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, SETID, 0, 1),                  \
    RET_ERRNO(EPERM)

/* refuse `nr` outright (3 instructions) */
#define DENY(nr, e)                                                     \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR),                             \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1),                    \
    RET_ERRNO(e)

static struct sock_filter filter[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
#if defined(__x86_64__)
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR),  /* x32 system calls: another numbering, refused */
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
    RET_ERRNO(ENOSYS),
    SETID_MODE(__NR_chmod, 1),
    SETID_MODE(__NR_creat, 1),
    SETID_MODE(__NR_mknod, 1),
    SETID_CREATE(__NR_open, 1, 2),
#endif
    SETID_MODE(__NR_fchmod, 1),
    SETID_MODE(__NR_fchmodat, 2),
    SETID_MODE(452, 2),  /* fchmodat2 (Linux 6.6) */
    SETID_MODE(__NR_mknodat, 2),
    SETID_CREATE(__NR_openat, 2, 3),
    DENY(__NR_setxattr, EPERM),
    DENY(__NR_lsetxattr, EPERM),
    DENY(__NR_fsetxattr, EPERM),
    DENY(463, EPERM),  /* setxattrat (Linux 6.13) */
    DENY(437, ENOSYS),  /* openat2: its mode is behind a pointer */
    DENY(425, ENOSYS),  /* io_uring_setup: io_uring's operations bypass the filter */
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

static void fail(const char *what, const char *arg) {
    fprintf(stderr, "tw-vmjail: %s%s: %s\n", what, arg, strerror(errno));
    exit(125);
}

/* the directory at `path`, opened from / without following a symlink (O_PATH) */
static int open_nofollow(const char *path) {
    char buf[4096];
    if (path[0] != '/' || strlen(path) >= sizeof buf) {
        errno = EINVAL;
        fail("not an absolute path: ", path);
    }
    strcpy(buf, path);
    int fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    for (char *save = NULL, *part = strtok_r(buf, "/", &save); part && fd >= 0; part = strtok_r(NULL, "/", &save)) {
        int next = (!strcmp(part, "..") || !strcmp(part, "."))
                       ? (errno = EINVAL, -1)
                       : openat(fd, part, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(fd);
        fd = next;
    }
    if (fd < 0) fail("the volume's directory is no longer a plain directory (a symlink, or gone): ", path);
    return fd;
}

static void bind_volume(const char *dir, const char *mnt, int ro) {
    if (unshare(CLONE_NEWNS) < 0) fail("unshare", "");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) fail("mount --make-rprivate /", "");
    int fd = open_nofollow(dir);
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
    if (mount(src, mnt, NULL, MS_BIND, NULL) < 0) fail("cannot bind the volume on ", mnt);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
    if (mount(NULL, mnt, NULL, flags, NULL) < 0) fail("cannot make the volume nosuid,nodev on ", mnt);
    close(fd);
}

int main(int argc, char **argv) {
    int i = 2;
    if (argc >= 6 && !strcmp(argv[2], "--bind")) {
        int ro = !strcmp(argv[5], "--ro");
        bind_volume(argv[3], argv[4], ro);
        i = ro ? 6 : 5;
    }
    if (argc < i + 2 || strcmp(argv[i], "--")) {
        fprintf(stderr, "usage: tw-vmjail KEEP_CAPS_HEX [--bind DIR MNT [--ro]] -- PROGRAM [ARGS...]\n");
        return 125;
    }
    unsigned long long keep = strtoull(argv[1], NULL, 16);
    for (int cap = 0; cap < 64; cap++) {
        if (keep & (1ULL << cap)) continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) {
            perror("tw-vmjail: cannot drop a capability from the bounding set");
            return 125;
        }
    }
    struct sock_fprog prog = {.len = sizeof filter / sizeof *filter, .filter = filter};
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) {
        perror("tw-vmjail: cannot install the seccomp filter");
        return 125;
    }
    execvp(argv[i + 1], argv + i + 1);
    fprintf(stderr, "tw-vmjail: cannot run %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
