/* A disk cache of OpenCL program binaries for libgpuarray's kernels.
 *
 * libgpuarray 0.7.6 builds each kernel with clCompileProgram (source + the cluda
 * header) and clLinkProgram, in every process: its OpenCL backend has no kernel cache
 * (its CUDA backend has one).  This library has the SONAME libOpenCL.so, the name
 * libgpuarray dlopens, and is loaded (by gpu_ver/clcache.py) before libgpuarray opens
 * OpenCL, so that dlopen returns it.  It defines three functions; every other OpenCL
 * function libgpuarray looks up resolves in its dependency, the real ICD loader
 * libOpenCL.so.1.
 *
 *   clCompileProgram(p, ...)  key = device, driver, options, headers and p's source.
 *       A stored binary whose file holds exactly that key is built with
 *       clCreateProgramWithBinary + clBuildProgram and remembered for p; p itself is
 *       not compiled.  Otherwise p is compiled and the key is remembered.
 *   clLinkProgram(1, {p})     returns the remembered binary program (one reference),
 *       or links p and stores the linked program's binary under p's key.
 *   clReleaseProgram(p)       forgets p.
 *
 * A binary is what the same source, options and device produced, so the kernels, and
 * every result, are the same.  Files are written to a temporary name and renamed.
 * Nothing is cached until hpo_clcache_set_dir gives a folder.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int32_t cl_int;
typedef uint32_t cl_uint;
typedef cl_uint cl_program_info;
typedef cl_uint cl_device_info;
typedef cl_uint cl_platform_info;
typedef struct _cl_context *cl_context;
typedef struct _cl_program *cl_program;
typedef struct _cl_device_id *cl_device_id;
typedef struct _cl_platform_id *cl_platform_id;
typedef void (*notify_fn)(cl_program, void *);

#define CL_SUCCESS 0
#define CL_PLATFORM_VERSION 0x0901
#define CL_DEVICE_NAME 0x102B
#define CL_DRIVER_VERSION 0x102D
#define CL_DEVICE_VERSION 0x102F
#define CL_DEVICE_PLATFORM 0x1031
#define CL_PROGRAM_NUM_DEVICES 0x1162
#define CL_PROGRAM_DEVICES 0x1163
#define CL_PROGRAM_SOURCE 0x1164
#define CL_PROGRAM_BINARY_SIZES 0x1165
#define CL_PROGRAM_BINARIES 0x1166

static const char MAGIC[8] = "HPOCLC1";

/* ------------------------------------------------------------ the real functions */
static void *real_lib;
static cl_int (*r_compile)(cl_program, cl_uint, const cl_device_id *, const char *, cl_uint,
                           const cl_program *, const char **, notify_fn, void *);
static cl_program (*r_link)(cl_context, cl_uint, const cl_device_id *, const char *, cl_uint,
                            const cl_program *, notify_fn, void *, cl_int *);
static cl_int (*r_release)(cl_program);
static cl_int (*r_pinfo)(cl_program, cl_program_info, size_t, void *, size_t *);
static cl_int (*r_dinfo)(cl_device_id, cl_device_info, size_t, void *, size_t *);
static cl_int (*r_platinfo)(cl_platform_id, cl_platform_info, size_t, void *, size_t *);
static cl_program (*r_with_binary)(cl_context, cl_uint, const cl_device_id *, const size_t *,
                                   const unsigned char **, cl_int *, cl_int *);
static cl_int (*r_build)(cl_program, cl_uint, const cl_device_id *, const char *, notify_fn, void *);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void load_real(void) {
    real_lib = dlopen("libOpenCL.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!real_lib) return;
    r_compile = dlsym(real_lib, "clCompileProgram");
    r_link = dlsym(real_lib, "clLinkProgram");
    r_release = dlsym(real_lib, "clReleaseProgram");
    r_pinfo = dlsym(real_lib, "clGetProgramInfo");
    r_dinfo = dlsym(real_lib, "clGetDeviceInfo");
    r_platinfo = dlsym(real_lib, "clGetPlatformInfo");
    r_with_binary = dlsym(real_lib, "clCreateProgramWithBinary");
    r_build = dlsym(real_lib, "clBuildProgram");
}

/* ------------------------------------------------------------ state */
static char *cache_dir;                 /* NULL: pass everything through */
static long stats[4];                   /* hits, misses, stores, failures */

typedef struct entry {
    cl_program p;
    char *key;                          /* set after a miss: stored at link */
    size_t key_len;
    cl_program built;                   /* set after a hit: returned at link */
    struct entry *next;
} entry;
static entry *entries;

static entry *find(cl_program p, int unlink) {
    for (entry **e = &entries; *e; e = &(*e)->next)
        if ((*e)->p == p) {
            entry *f = *e;
            if (unlink) *e = f->next;
            return f;
        }
    return NULL;
}

static void drop(entry *e) {
    if (!e) return;
    if (e->built) r_release(e->built);
    free(e->key);
    free(e);
}

int hpo_clcache_set_dir(const char *dir) {
    pthread_mutex_lock(&lock);
    free(cache_dir);
    cache_dir = dir && *dir ? strdup(dir) : NULL;
    pthread_mutex_unlock(&lock);
    return 0;
}

void hpo_clcache_stats(long *out) {
    pthread_mutex_lock(&lock);
    memcpy(out, stats, sizeof stats);
    pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------ the key */
typedef struct { char *s; size_t n, cap; int bad; } buf;

static void put(buf *b, const void *p, size_t n) {
    if (b->bad) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *s = realloc(b->s, cap);
        if (!s) { b->bad = 1; return; }
        b->s = s; b->cap = cap;
    }
    memcpy(b->s + b->n, p, n);
    b->n += n;
    b->s[b->n] = 0;
}
static void puts0(buf *b, const char *s) { put(b, s ? s : "", strlen(s ? s : "")); put(b, "\n", 1); }

static void put_info(buf *b, cl_int (*fn)(void *, cl_uint, size_t, void *, size_t *), void *obj, cl_uint what) {
    size_t n = 0;
    if (fn(obj, what, 0, NULL, &n) != CL_SUCCESS || n == 0) { b->bad = 1; return; }
    char *s = malloc(n);
    if (!s || fn(obj, what, n, s, NULL) != CL_SUCCESS) { free(s); b->bad = 1; return; }
    put(b, s, strnlen(s, n));
    put(b, "\n", 1);
    free(s);
}
#define INFO(b, fn, obj, what) put_info(b, (cl_int (*)(void *, cl_uint, size_t, void *, size_t *))(fn), obj, what)

/* The one device of a program, or NULL. */
static cl_device_id one_device(cl_program p) {
    cl_uint n = 0;
    cl_device_id d = NULL;
    if (r_pinfo(p, CL_PROGRAM_NUM_DEVICES, sizeof n, &n, NULL) != CL_SUCCESS || n != 1) return NULL;
    if (r_pinfo(p, CL_PROGRAM_DEVICES, sizeof d, &d, NULL) != CL_SUCCESS) return NULL;
    return d;
}

static int make_key(buf *b, cl_program p, cl_device_id d, const char *options, cl_uint nh,
                    const cl_program *headers, const char **names) {
    cl_platform_id plat = NULL;
    puts0(b, "hpo-clcache 1");
    if (r_dinfo(d, CL_DEVICE_PLATFORM, sizeof plat, &plat, NULL) != CL_SUCCESS) return -1;
    INFO(b, r_platinfo, plat, CL_PLATFORM_VERSION);
    INFO(b, r_dinfo, d, CL_DEVICE_NAME);
    INFO(b, r_dinfo, d, CL_DEVICE_VERSION);
    INFO(b, r_dinfo, d, CL_DRIVER_VERSION);
    puts0(b, options);
    for (cl_uint i = 0; i < nh; i++) {
        puts0(b, names ? names[i] : "");
        INFO(b, r_pinfo, headers[i], CL_PROGRAM_SOURCE);
    }
    INFO(b, r_pinfo, p, CL_PROGRAM_SOURCE);
    return b->bad ? -1 : 0;
}

static uint64_t fnv(const char *s, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
    return h;
}

static char *path_of(const char *key, size_t n) {
    uint64_t a = fnv(key, n, 14695981039346656037ULL), c = fnv(key, n, 0x9e3779b97f4a7c15ULL);
    size_t len = strlen(cache_dir) + 64;
    char *path = malloc(len);
    if (path) snprintf(path, len, "%s/%016llx%016llx.bin", cache_dir, (unsigned long long)a,
                       (unsigned long long)c);
    return path;
}

/* The binary stored under exactly this key, or NULL. */
static unsigned char *read_binary(const char *key, size_t key_len, size_t *size) {
    char *path = path_of(key, key_len);
    FILE *f = path ? fopen(path, "rb") : NULL;
    free(path);
    if (!f) return NULL;
    char magic[8];
    uint64_t kn = 0, bn = 0;
    unsigned char *bin = NULL;
    char *k = NULL;
    if (fread(magic, 1, 8, f) == 8 && !memcmp(magic, MAGIC, 8) && fread(&kn, 8, 1, f) == 1 && kn == key_len
        && (k = malloc(kn)) && fread(k, 1, kn, f) == kn && !memcmp(k, key, kn)
        && fread(&bn, 8, 1, f) == 1 && bn > 0 && (bin = malloc(bn)) && fread(bin, 1, bn, f) == bn) {
        *size = bn;
    } else {
        free(bin);
        bin = NULL;
    }
    free(k);
    fclose(f);
    return bin;
}

static void store_binary(const char *key, size_t key_len, cl_program linked) {
    size_t size = 0;
    unsigned char *bin = NULL;
    char *path = path_of(key, key_len), *tmp = NULL;
    int ok = 0;
    if (path && r_pinfo(linked, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, NULL) == CL_SUCCESS && size > 0
        && (bin = malloc(size)) && r_pinfo(linked, CL_PROGRAM_BINARIES, sizeof bin, &bin, NULL) == CL_SUCCESS
        && (tmp = malloc(strlen(path) + 32))) {
        snprintf(tmp, strlen(path) + 32, "%s.%ld.tmp", path, (long)getpid());
        FILE *f = fopen(tmp, "wb");
        uint64_t kn = key_len, bn = size;
        if (f) {
            ok = fwrite(MAGIC, 1, 8, f) == 8 && fwrite(&kn, 8, 1, f) == 1 && fwrite(key, 1, kn, f) == kn
                 && fwrite(&bn, 8, 1, f) == 1 && fwrite(bin, 1, bn, f) == bn;
            ok = (fclose(f) == 0) && ok && rename(tmp, path) == 0;
            if (!ok) unlink(tmp);
        }
    }
    stats[ok ? 2 : 3]++;
    free(bin); free(tmp); free(path);
}

/* ------------------------------------------------------------ the three functions */
cl_int clCompileProgram(cl_program p, cl_uint nd, const cl_device_id *devs, const char *options,
                        cl_uint nh, const cl_program *headers, const char **names, notify_fn cb,
                        void *ud) {
    pthread_once(&once, load_real);
    if (!r_compile) return -5; /* CL_OUT_OF_RESOURCES: no real OpenCL */
    pthread_mutex_lock(&lock);
    cl_device_id d = (cache_dir && !cb) ? one_device(p) : NULL;
    buf key = {0};
    if (d && (nd == 0 || (nd == 1 && devs[0] == d)) && make_key(&key, p, d, options, nh, headers, names) == 0) {
        size_t size = 0;
        unsigned char *bin = read_binary(key.s, key.n, &size);
        if (bin) {
            cl_program ctx_src = p;
            cl_context ctx = NULL;
            cl_int st = 0, err = -1;
            r_pinfo(ctx_src, 0x1161 /* CL_PROGRAM_CONTEXT */, sizeof ctx, &ctx, NULL);
            const unsigned char *bins[1] = {bin};
            cl_program bp = ctx ? r_with_binary(ctx, 1, &d, &size, bins, &st, &err) : NULL;
            free(bin);
            if (bp && err == CL_SUCCESS && st == CL_SUCCESS && r_build(bp, 1, &d, options, NULL, NULL) == CL_SUCCESS) {
                entry *e = calloc(1, sizeof *e);
                if (e) {
                    drop(find(p, 1));
                    e->p = p; e->built = bp; e->next = entries; entries = e;
                    stats[0]++;
                    free(key.s);
                    pthread_mutex_unlock(&lock);
                    return CL_SUCCESS;
                }
            }
            if (bp) r_release(bp);
            stats[3]++;
        }
        entry *e = calloc(1, sizeof *e);
        if (e) {
            drop(find(p, 1));
            e->p = p; e->key = key.s; e->key_len = key.n; e->next = entries; entries = e;
            key.s = NULL;
            stats[1]++;
        }
    }
    free(key.s);
    pthread_mutex_unlock(&lock);
    return r_compile(p, nd, devs, options, nh, headers, names, cb, ud);
}

cl_program clLinkProgram(cl_context ctx, cl_uint nd, const cl_device_id *devs, const char *options,
                         cl_uint np, const cl_program *progs, notify_fn cb, void *ud, cl_int *err) {
    pthread_once(&once, load_real);
    if (!r_link) { if (err) *err = -5; return NULL; }
    pthread_mutex_lock(&lock);
    entry *e = np == 1 ? find(progs[0], 1) : NULL;
    pthread_mutex_unlock(&lock);
    if (e && e->built) {
        cl_program bp = e->built;
        e->built = NULL;
        drop(e);
        if (err) *err = CL_SUCCESS;
        return bp;
    }
    cl_program out = r_link(ctx, nd, devs, options, np, progs, cb, ud, err);
    if (e && e->key && out && !cb && (!err || *err == CL_SUCCESS)) {
        pthread_mutex_lock(&lock);
        if (cache_dir) store_binary(e->key, e->key_len, out);
        pthread_mutex_unlock(&lock);
    }
    drop(e);
    return out;
}

cl_int clReleaseProgram(cl_program p) {
    pthread_once(&once, load_real);
    if (!r_release) return -5;
    pthread_mutex_lock(&lock);
    entry *e = find(p, 1);
    pthread_mutex_unlock(&lock);
    drop(e);
    return r_release(p);
}
