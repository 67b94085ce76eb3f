/*
 * p11fault: a PKCS#11 module that forwards every call to a real module
 * (SoftHSM in dkimgw's tests) and injects the failures a network HSM
 * shows, steered by a control file the test rewrites while the process
 * that loaded it runs:
 *
 *   error=0x30            return this CKR from the calls in error_ops
 *   error_ops=C_Sign,...  which calls fail ("all": every forwarded call
 *                         below; default C_Sign)
 *   hang_ms=3000          sleep this long before forwarding hang_ops
 *   hang_ops=C_Sign       (default C_Sign; C_Sign/result: only the C_Sign
 *                         that returns the signature, not a length query
 *                         with a NULL buffer, which upstream miekg/pkcs11
 *                         makes before every signature and dkimgw's patched
 *                         copy only for a signature over 512 bytes)
 *   close_all=N           when N changes: close every session of every
 *                         slot (C_CloseAllSessions) behind the caller
 *
 * One key=value per line or separated by blanks; an absent or empty file
 * injects nothing. Environment: P11FAULT_MODULE (the real module, default
 * SoftHSM's), P11FAULT_CONTROL (the control file), P11FAULT_LOG (one line
 * appended per injected fault, so that a test can tell that its fault
 * was hit), P11FAULT_SESSIONS (the number of sessions the process has open
 * in the real module, rewritten at each change: a count kept outside the
 * caller's own books, for a soak to watch).
 *
 * A failed C_Sign must end the signing operation (PKCS#11 5.12): the
 * call is forwarded and its result thrown away, so the real session is
 * left as a real token's would be. Sessions are closed while no call is
 * in the real module (a writer lock against every forwarded call):
 * SoftHSM frees a session that another thread may be using otherwise.
 *
 * Built by the tests: cc -shared -fPIC -I<miekg/pkcs11> p11fault.c -ldl -lpthread
 */
#define _GNU_SOURCE
#define CK_PTR *
#define NULL_PTR 0
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType (*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType (*name)
#include "pkcs11.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static CK_FUNCTION_LIST real;   /* the real module's table */
static CK_FUNCTION_LIST table;  /* what we hand out */
static int loaded;
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;

/* Calls into the real module hold it shared; closing every session holds it
 * exclusively. Writers first, or a busy pool would starve the close. */
static pthread_rwlock_t call_lock;

static pthread_mutex_t cfg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
	struct timespec mtime;
	ino_t ino;
	off_t size;
	int have;
	CK_RV error;
	char error_ops[512];
	long hang_ms;
	char hang_ops[512];
	long close_all;
} cfg;
static long closed_seq; /* the close_all value last acted on */

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
	const char *path = getenv("P11FAULT_LOG");
	if (!path || !*path) return;
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n <= 0) return;
	if (n >= (int)sizeof line) n = sizeof line - 1;
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) return;
	/* One write with O_APPEND: lines from several threads never mix. */
	(void)!write(fd, line, n);
	close(fd);
}

/* refresh re-reads the control file when it changed (tests replace it by
 * rename, which changes the inode). */
static void refresh(void) {
	const char *path = getenv("P11FAULT_CONTROL");
	struct stat st;
	pthread_mutex_lock(&cfg_mu);
	if (!path || stat(path, &st) != 0) {
		cfg.error = 0; cfg.hang_ms = 0; cfg.have = 0;
		pthread_mutex_unlock(&cfg_mu);
		return;
	}
	if (cfg.have && st.st_ino == cfg.ino && st.st_size == cfg.size &&
	    st.st_mtim.tv_sec == cfg.mtime.tv_sec && st.st_mtim.tv_nsec == cfg.mtime.tv_nsec) {
		pthread_mutex_unlock(&cfg_mu);
		return;
	}
	char buf[4096];
	size_t n = 0;
	FILE *f = fopen(path, "re");
	if (f) {
		n = fread(buf, 1, sizeof buf - 1, f);
		fclose(f);
	}
	buf[n] = 0;
	cfg.error = 0; cfg.hang_ms = 0;
	strcpy(cfg.error_ops, "C_Sign");
	strcpy(cfg.hang_ops, "C_Sign");
	char *save = NULL;
	for (char *tok = strtok_r(buf, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
		char *eq = strchr(tok, '=');
		if (!eq) continue;
		*eq = 0;
		const char *k = tok, *v = eq + 1;
		if (!strcmp(k, "error")) cfg.error = strtoul(v, NULL, 0);
		else if (!strcmp(k, "error_ops")) snprintf(cfg.error_ops, sizeof cfg.error_ops, "%s", v);
		else if (!strcmp(k, "hang_ms")) cfg.hang_ms = strtol(v, NULL, 0);
		else if (!strcmp(k, "hang_ops")) snprintf(cfg.hang_ops, sizeof cfg.hang_ops, "%s", v);
		else if (!strcmp(k, "close_all")) cfg.close_all = strtol(v, NULL, 0);
	}
	cfg.ino = st.st_ino; cfg.size = st.st_size; cfg.mtime = st.st_mtim; cfg.have = 1;
	pthread_mutex_unlock(&cfg_mu);
}

/* listed reports whether op is in the comma-separated list ops ("all"
 * matches every op). */
static int listed(const char *ops, const char *op) {
	if (!strcmp(ops, "all")) return 1;
	size_t n = strlen(op);
	for (const char *p = ops; *p;) {
		const char *c = strchr(p, ',');
		size_t len = c ? (size_t)(c - p) : strlen(p);
		if (len == n && !strncmp(p, op, n)) return 1;
		if (!c) break;
		p = c + 1;
	}
	return 0;
}

/* Sessions open in the real module: counted here as the shim sees them
 * opened and closed; C_CloseAllSessions and C_Finalize end them all (the
 * tests use one token). Written to P11FAULT_SESSIONS by rename, so that a
 * reader never sees half a number. */
static pthread_mutex_t sess_mu = PTHREAD_MUTEX_INITIALIZER;
static long open_sessions;

static void sessions_changed(long delta, int reset) {
	const char *path = getenv("P11FAULT_SESSIONS");
	pthread_mutex_lock(&sess_mu);
	open_sessions = reset ? 0 : open_sessions + delta;
	if (path && *path) {
		char tmp[4096];
		snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
		FILE *f = fopen(tmp, "we");
		if (f) {
			fprintf(f, "%ld\n", open_sessions);
			if (fclose(f) == 0) rename(tmp, path);
		}
	}
	pthread_mutex_unlock(&sess_mu);
}

static void close_all_now(long seq) {
	pthread_rwlock_wrlock(&call_lock);
	pthread_mutex_lock(&cfg_mu);
	int todo = seq != closed_seq;
	closed_seq = seq;
	pthread_mutex_unlock(&cfg_mu);
	if (todo) {
		CK_SLOT_ID slots[64];
		CK_ULONG count = 64;
		int closed = 0;
		if (real.C_GetSlotList(CK_TRUE, slots, &count) == CKR_OK) {
			for (CK_ULONG i = 0; i < count; i++)
				if (real.C_CloseAllSessions(slots[i]) == CKR_OK) closed++;
		}
		sessions_changed(0, 1);
		logf_("close_all %ld slots=%d\n", seq, closed);
	}
	pthread_rwlock_unlock(&call_lock);
}

/* before runs ahead of every forwarded call: it acts on close_all, hangs,
 * and returns the CKR to inject (0: none). */
static CK_RV before(const char *op) {
	refresh();
	pthread_mutex_lock(&cfg_mu);
	long seq = cfg.close_all;
	int do_close = cfg.have && seq != closed_seq;
	long hang = (cfg.hang_ms > 0 && listed(cfg.hang_ops, op)) ? cfg.hang_ms : 0;
	CK_RV err = (cfg.error && listed(cfg.error_ops, op)) ? cfg.error : 0;
	pthread_mutex_unlock(&cfg_mu);
	/* close_all acts on the next forwarded call of any thread (C_Initialize
	 * and C_Finalize are not forwarded through here). */
	if (do_close) close_all_now(seq);
	if (hang) {
		logf_("hang %s %ld\n", op, hang);
		struct timespec ts = {hang / 1000, (hang % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
	}
	if (err) logf_("error %s 0x%lx\n", op, (unsigned long)err);
	return err;
}

#define FWD(name, params, args)                                   \
	static CK_RV w_##name params {                                \
		CK_RV inj = before(#name);                                \
		if (inj) return inj;                                      \
		pthread_rwlock_rdlock(&call_lock);                        \
		CK_RV rv = real.name args;                                \
		pthread_rwlock_unlock(&call_lock);                        \
		return rv;                                                \
	}

FWD(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR c), (p, l, c))
FWD(C_GetSlotInfo, (CK_SLOT_ID s, CK_SLOT_INFO_PTR i), (s, i))
FWD(C_GetTokenInfo, (CK_SLOT_ID s, CK_TOKEN_INFO_PTR i), (s, i))
FWD(C_GetMechanismList, (CK_SLOT_ID s, CK_MECHANISM_TYPE_PTR l, CK_ULONG_PTR c), (s, l, c))
FWD(C_GetMechanismInfo, (CK_SLOT_ID s, CK_MECHANISM_TYPE t, CK_MECHANISM_INFO_PTR i), (s, t, i))

/* The session calls forward as FWD does and keep the count. */
static CK_RV w_C_OpenSession(CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n, CK_SESSION_HANDLE_PTR h) {
	CK_RV inj = before("C_OpenSession");
	if (inj) return inj;
	pthread_rwlock_rdlock(&call_lock);
	CK_RV rv = real.C_OpenSession(s, f, a, n, h);
	if (rv == CKR_OK) sessions_changed(1, 0);
	pthread_rwlock_unlock(&call_lock);
	return rv;
}

static CK_RV w_C_CloseSession(CK_SESSION_HANDLE h) {
	CK_RV inj = before("C_CloseSession");
	if (inj) return inj;
	pthread_rwlock_rdlock(&call_lock);
	CK_RV rv = real.C_CloseSession(h);
	if (rv == CKR_OK) sessions_changed(-1, 0);
	pthread_rwlock_unlock(&call_lock);
	return rv;
}

static CK_RV w_C_CloseAllSessions(CK_SLOT_ID s) {
	CK_RV inj = before("C_CloseAllSessions");
	if (inj) return inj;
	pthread_rwlock_rdlock(&call_lock);
	CK_RV rv = real.C_CloseAllSessions(s);
	if (rv == CKR_OK) sessions_changed(0, 1);
	pthread_rwlock_unlock(&call_lock);
	return rv;
}

/* C_Finalize is not a fault point: it only ends the count. */
static CK_RV w_C_Finalize(CK_VOID_PTR p) {
	CK_RV rv = real.C_Finalize(p);
	if (rv == CKR_OK) sessions_changed(0, 1);
	return rv;
}
FWD(C_GetSessionInfo, (CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR i), (h, i))
FWD(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG l), (h, u, p, l))
FWD(C_Logout, (CK_SESSION_HANDLE h), (h))
FWD(C_GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG c), (h, o, t, c))
FWD(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG c), (h, t, c))
FWD(C_FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR c), (h, o, m, c))
FWD(C_FindObjectsFinal, (CK_SESSION_HANDLE h), (h))
FWD(C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
FWD(C_GenerateKeyPair, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt, CK_ULONG pc, CK_ATTRIBUTE_PTR vt, CK_ULONG vc, CK_OBJECT_HANDLE_PTR pk, CK_OBJECT_HANDLE_PTR vk), (h, m, pt, pc, vt, vc, pk, vk))
FWD(C_DestroyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o), (h, o))

/* hang_only delays op as hang_ops says, and does nothing else. */
static void hang_only(const char *op) {
	pthread_mutex_lock(&cfg_mu);
	long hang = (cfg.hang_ms > 0 && listed(cfg.hang_ops, op)) ? cfg.hang_ms : 0;
	pthread_mutex_unlock(&cfg_mu);
	if (hang) {
		logf_("hang %s %ld\n", op, hang);
		struct timespec ts = {hang / 1000, (hang % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
	}
}

/* C_Sign fails after the real call, so that the signing operation ends in
 * the real module as it does in a token that fails the call. */
static CK_RV w_C_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR s, CK_ULONG_PTR sl) {
	CK_RV inj = before("C_Sign");
	if (s != NULL) hang_only("C_Sign/result");
	pthread_rwlock_rdlock(&call_lock);
	CK_RV rv = real.C_Sign(h, d, dl, s, sl);
	if (inj && rv == CKR_OK && s == NULL) {
		/* A length query leaves the operation active: finish it. */
		CK_ULONG n = *sl;
		CK_BYTE *tmp = malloc(n ? n : 1);
		if (tmp) {
			(void)real.C_Sign(h, d, dl, tmp, &n);
			free(tmp);
		}
	}
	pthread_rwlock_unlock(&call_lock);
	return inj ? inj : rv;
}

static int load(void) {
	pthread_mutex_lock(&load_mu);
	if (!loaded) {
		pthread_rwlockattr_t a;
		pthread_rwlockattr_init(&a);
		pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&call_lock, &a);
		const char *path = getenv("P11FAULT_MODULE");
		if (!path || !*path) path = "/usr/lib/softhsm/libsofthsm2.so";
		void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
		CK_C_GetFunctionList get = lib ? (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList") : NULL;
		CK_FUNCTION_LIST_PTR fl = NULL;
		if (get && get(&fl) == CKR_OK && fl) {
			real = *fl;
			table = *fl;
#define SET(name) table.name = w_##name
			SET(C_GetSlotList); SET(C_GetSlotInfo); SET(C_GetTokenInfo);
			SET(C_GetMechanismList); SET(C_GetMechanismInfo);
			SET(C_OpenSession); SET(C_CloseSession); SET(C_CloseAllSessions);
			SET(C_GetSessionInfo); SET(C_Login); SET(C_Logout);
			SET(C_GetAttributeValue); SET(C_FindObjectsInit); SET(C_FindObjects);
			SET(C_FindObjectsFinal); SET(C_SignInit); SET(C_Sign);
			SET(C_GenerateKeyPair); SET(C_DestroyObject); SET(C_Finalize);
			table.C_GetFunctionList = C_GetFunctionList;
			loaded = 1;
		}
	}
	pthread_mutex_unlock(&load_mu);
	return loaded;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR pp) {
	if (!pp) return CKR_ARGUMENTS_BAD;
	if (!load()) return CKR_GENERAL_ERROR;
	*pp = &table;
	return CKR_OK;
}
