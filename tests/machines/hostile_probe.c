/* What a hostile image tries, one probe per argument; prints "probe=ok" or "probe=<errno>".
 * Built statically by tests/machines/test_hostile.py and put into a test image. Nothing here
 * writes anywhere but the paths the test passes in. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define KEY_SPEC_SESSION_KEYRING -3
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_SEARCH 10

static void report(const char *name, long rc) {
	if (rc < 0) printf("%s=%s\n", name, strerrorname_np(errno) ? strerrorname_np(errno) : "error");
	else printf("%s=ok\n", name);
	fflush(stdout);
}

int main(int argc, char **argv) {
	for (int i = 1; i < argc; i++) {
		char *a = argv[i];
		if (!strncmp(a, "mknod-write:", 12)) {  /* mknod-write:PATH:b|c:MAJ:MIN -- make a node, write "X" */
			char path[256], kind; unsigned maj, min;
			if (sscanf(a + 12, "%255[^:]:%c:%u:%u", path, &kind, &maj, &min) != 4) return 2;
			report("mknod", mknod(path, (kind == 'b' ? S_IFBLK : S_IFCHR) | 0600, makedev(maj, min)));
			int fd = open(path, O_WRONLY);
			report("open", fd);
			if (fd >= 0) report("write", write(fd, "X", 1));
		} else if (!strncmp(a, "open-write:", 11)) {  /* open an existing node for writing, write nothing */
			int fd = open(a + 11, O_WRONLY);
			report("open", fd);
		} else if (!strcmp(a, "keyring")) {  /* the session keyring, and a key the host put there */
			report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
			report("search", syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, "user", "taxiway-canary", 0));
		} else if (!strcmp(a, "add-key")) {
			report("add_key", syscall(SYS_add_key, "user", "taxiway-inside", "x", 1, KEY_SPEC_SESSION_KEYRING));
		} else if (!strcmp(a, "userns")) {
			report("unshare_user", unshare(CLONE_NEWUSER));
		} else if (!strncmp(a, "cgroup-escape:", 14)) {  /* user+mount+cgroup namespaces, then mount a v1 hierarchy */
			const char *dir = a + 14;
			if (unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP) < 0) { report("unshare", -1); continue; }
			report("unshare", 0);
			mkdir(dir, 0700);
			if (mount("cgroup", dir, "cgroup", 0, "freezer") < 0) { report("mount", -1); continue; }
			report("mount", 0);
			DIR *d = opendir(dir);
			int groups = 0;
			struct dirent *e;
			while (d && (e = readdir(d)))
				if (e->d_type == DT_DIR && e->d_name[0] != '.') groups++;
			printf("groups=%d\n", groups);
		} else if (!strcmp(a, "syscalls")) {
			report("bpf", syscall(SYS_bpf, 0, NULL, 0));
			report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
			report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
			report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
			report("add_key", syscall(SYS_add_key, "user", "k", "x", 1, KEY_SPEC_SESSION_KEYRING));
			report("unshare_user", unshare(CLONE_NEWUSER));
		} else if (!strncmp(a, "fd-write:", 9)) {  /* fd-write:N -- write a file through an inherited fd */
			char p[64];
			snprintf(p, sizeof p, "/proc/self/fd/%s/pwn", a + 9);
			int fd = open(p, O_WRONLY | O_CREAT, 0644);
			report("fdwrite", fd);
		} else {
			fprintf(stderr, "unknown probe %s\n", a);
			return 2;
		}
	}
	return 0;
}
