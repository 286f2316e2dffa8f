/* Meterline's counter store as a Redis module: the script redis_counters.lua, statement for statement, in C.
 *
 * Why it exists: a decision's Redis time. The script spends most of a lone decision in interpreted Lua
 * (~300 operations on 6 lines, each 30-300 ns) and in the conversions around its four commands; one
 * Redis then serves ~10-20k decisions/s. Here the same call takes a fraction of that (docs/benchmarks.md,
 * "The counter store as a Redis module"). It is an option for a Redis one runs oneself: managed Redis
 * services load no modules, and without it the client runs the script (storage/redis_counters.py).
 *
 * The command is the script's call with another name:
 *     METERLINE.COUNTERS <sha1 of redis_counters.lua> numkeys key... request record...
 * The SHA-1 is the version of the script this file mirrors, fixed when the module is built
 * (`meterline redis-module`): a call made for another version is refused before anything runs
 * ("METERLINE-VERSION ..."), and the client runs its own script instead. The request, the keys, the
 * answer and every stored field are the script's: a Redis may serve processes of both kinds at once.
 * The header of redis_counters.lua says what each part of the request is; the comments below name the
 * script's parts they mirror.
 *
 * Exactness: amounts are 128-bit integers here (the script's limbs); stored values are decimal strings,
 * and an answered value below 2^53 is a MessagePack integer, else a decimal string, as the script's.
 *
 * Atomicity and replication: a module command runs alone, like a script. Its writes are Redis commands
 * called with replication ("!"), so replicas and the AOF receive plain HSET/HDEL/ZADD/EXPIRE commands in
 * one MULTI/EXEC and need no module. The command is declared "write deny-oom": Redis refuses it whole on a
 * replica or when out of memory, never half-way. Redis Cluster routes it by its first key, as the keys of a
 * call share one hash tag (RedisModule_OnLoad says why not all of them), and the call checks the others
 * before it runs (numkeys_here). The whole request is checked before the first command (check_request):
 * a malformed call is an error that changed nothing, never a crash.
 *
 * The module API is declared by hand below (the functions and constants this file uses, as Redis >= 7.0
 * exports them): Debian's Redis packages ship no redismodule.h.
 */

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef METERLINE_SCRIPT_SHA
#error "build with -DMETERLINE_SCRIPT_SHA=\"<sha1 of redis_counters.lua>\" (meterline redis-module does)"
#endif

/* -- the module API (Redis >= 7.0) ------------------------------------------------------------------- */

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleCallReply RedisModuleCallReply;
typedef int (*RedisModuleCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

#define RM_OK 0
#define RM_ERR 1
#define RM_APIVER_1 1
#define RM_REPLY_STRING 0
#define RM_REPLY_ERROR 1
#define RM_REPLY_INTEGER 2
#define RM_REPLY_ARRAY 3
#define RM_REPLY_NULL 4

static int (*RedisModule_GetApi)(const char *, void *);
static void (*RedisModule_SetModuleAttribs)(RedisModuleCtx *, const char *, int, int);
static int (*RedisModule_CreateCommand)(RedisModuleCtx *, const char *, RedisModuleCmdFunc, const char *, int, int,
                                        int);
static int (*RedisModule_WrongArity)(RedisModuleCtx *);
static int (*RedisModule_GetContextFlags)(RedisModuleCtx *);
#define RM_CTX_FLAGS_CLUSTER (1 << 5)
static int (*RedisModule_ReplyWithError)(RedisModuleCtx *, const char *);
static int (*RedisModule_ReplyWithStringBuffer)(RedisModuleCtx *, const char *, size_t);
static const char *(*RedisModule_StringPtrLen)(const RedisModuleString *, size_t *);
static RedisModuleString *(*RedisModule_CreateString)(RedisModuleCtx *, const char *, size_t);
static void (*RedisModule_FreeString)(RedisModuleCtx *, RedisModuleString *);
static RedisModuleCallReply *(*RedisModule_Call)(RedisModuleCtx *, const char *, const char *, ...);
static void (*RedisModule_FreeCallReply)(RedisModuleCallReply *);
static int (*RedisModule_CallReplyType)(RedisModuleCallReply *);
static long long (*RedisModule_CallReplyInteger)(RedisModuleCallReply *);
static size_t (*RedisModule_CallReplyLength)(RedisModuleCallReply *);
static RedisModuleCallReply *(*RedisModule_CallReplyArrayElement)(RedisModuleCallReply *, size_t);
static const char *(*RedisModule_CallReplyStringPtr)(RedisModuleCallReply *, size_t *);
static void *(*RedisModule_Alloc)(size_t);
static void *(*RedisModule_Realloc)(void *, size_t);
static void (*RedisModule_Free)(void *);

#define GET_API(name) RedisModule_GetApi("RedisModule_" #name, (void *)&RedisModule_##name)

/* -- one call's memory: an arena, emptied when the call ends ----------------------------------------- */

typedef struct Block {
    struct Block *next;
    size_t used, size;
    _Alignas(16) char data[]; /* 16: the compiler moves 128-bit amounts with aligned instructions */
} Block;

static Block *arena;
#define BLOCK 65536 /* bytes a block holds, unless one thing needs more */

static void *take(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (!arena || arena->used + n > arena->size) {
        size_t size = n > BLOCK ? n : BLOCK;
        Block *block = RedisModule_Alloc(sizeof(Block) + size);
        block->next = arena;
        block->used = 0;
        block->size = size;
        arena = block;
    }
    void *p = arena->data + arena->used;
    arena->used += n;
    return p;
}

/* A list in the arena (items, n used, *cap allocated) with room for `need` items of `size` bytes: grown by
   doubling from `first`, the items kept. */
static void *room(void *items, size_t n, size_t *cap, size_t need, size_t size, size_t first) {
    if (need <= *cap) return items;
    size_t c = *cap ? *cap * 2 : first;
    while (c < need) c *= 2;
    void *p = take(size * c);
    if (n) memcpy(p, items, size * n);
    *cap = c;
    return p;
}

static void arena_reset(void) {
    /* keep the newest block if it is of the usual size, free the rest: a call's memory is reused by the
       next, and one large call's is given back */
    if (!arena) return;
    Block *rest = arena->next;
    arena->next = NULL;
    arena->used = 0;
    if (arena->size > BLOCK) {
        arena->next = rest;
        rest = arena;
        arena = NULL;
    }
    while (rest) {
        Block *next = rest->next;
        RedisModule_Free(rest);
        rest = next;
    }
}

/* -- failures: a call stops where the script would raise ---------------------------------------------- */

#include <setjmp.h>
static jmp_buf fail_at;
static char fail_text[512];

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(fail_text, sizeof fail_text, "ERR meterline counters: ");
    vsnprintf(fail_text + n, sizeof fail_text - (size_t)n, fmt, ap);
    va_end(ap);
    longjmp(fail_at, 1);
}

/* -- amounts -------------------------------------------------------------------------------------------- */

typedef __int128 num;
#define EXACT ((num)9007199254740992LL) /* 2^53: below it an answer is a MessagePack integer */

static int parse_num(const char *s, size_t len, num *out) {
    if (len && len < 19) { /* the common case, in 64 bits (128-bit multiplication costs) */
        size_t i = s[0] == '-';
        if (i == len) return 0;
        int64_t v = 0;
        for (size_t k = i; k < len; k++) {
            if (s[k] < '0' || s[k] > '9') return 0;
            v = v * 10 + (s[k] - '0');
        }
        *out = i ? -v : v;
        return 1;
    }
    size_t i = 0;
    int negative = 0;
    if (len && s[0] == '-') {
        negative = 1;
        i = 1;
    }
    if (i == len || len - i > 38) return 0;
    num v = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = negative ? -v : v;
    return 1;
}

/* a decimal string into buf (at least 41 bytes); its length */
static size_t int_text(int64_t v, char *buf) { /* sprintf costs ~15 times as much */
    char tmp[24];
    size_t n = 0, len = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (v < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    buf[len] = 0;
    return len;
}

static size_t num_text(num v, char *buf) {
    if (v > -1000000000000000000LL && v < 1000000000000000000LL) /* in 64 bits: 128-bit division costs */
        return int_text((int64_t)v, buf);
    char tmp[41];
    size_t n = 0;
    int negative = v < 0;
    unsigned __int128 u = negative ? (unsigned __int128)(-(v + 1)) + 1 : (unsigned __int128)v;
    do {
        tmp[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    size_t len = 0;
    if (negative) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    buf[len] = 0;
    return len;
}

static int64_t parse_int(const char *s, size_t len) { /* Lua's tonumber of a stored second */
    num v;
    if (!parse_num(s, len, &v)) fail("not an integer: %.*s", (int)(len > 40 ? 40 : len), s);
    return (int64_t)v;
}

/* -- MessagePack: the request in, the answer out --------------------------------------------------------- */

enum { M_NIL, M_INT, M_STR, M_ARR };

typedef struct Node {
    int kind;
    int64_t i;
    const char *s;
    size_t len; /* a string's bytes, an array's items */
    struct Node *items;
} Node;

static const unsigned char *mp_at, *mp_end;

static uint64_t mp_be(int n) {
    if (mp_end - mp_at < n) fail("the request is cut short");
    uint64_t v = 0;
    for (int k = 0; k < n; k++) v = (v << 8) | mp_at[k];
    mp_at += n;
    return v;
}

static void mp_node(Node *node, int depth) {
    if (depth > 8) fail("the request nests too deep");
    if (mp_at >= mp_end) fail("the request is cut short");
    unsigned char b = *mp_at++;
    size_t n = 0;
    node->items = NULL;
    node->s = NULL;
    node->len = 0;
    node->i = 0;
    if (b <= 0x7f) {
        node->kind = M_INT;
        node->i = b;
        return;
    }
    if (b >= 0xe0) {
        node->kind = M_INT;
        node->i = (int8_t)b;
        return;
    }
    if ((b & 0xe0) == 0xa0) {
        n = b & 0x1f;
        goto string;
    }
    if ((b & 0xf0) == 0x90) {
        n = b & 0x0f;
        goto array;
    }
    switch (b) {
    case 0xc0: node->kind = M_NIL; return;
    case 0xcc: node->kind = M_INT; node->i = (int64_t)mp_be(1); return;
    case 0xcd: node->kind = M_INT; node->i = (int64_t)mp_be(2); return;
    case 0xce: node->kind = M_INT; node->i = (int64_t)mp_be(4); return;
    case 0xcf: {
        uint64_t v = mp_be(8);
        if (v > INT64_MAX) fail("an integer beyond 2^63 in the request");
        node->kind = M_INT;
        node->i = (int64_t)v;
        return;
    }
    case 0xd0: node->kind = M_INT; node->i = (int8_t)mp_be(1); return;
    case 0xd1: node->kind = M_INT; node->i = (int16_t)mp_be(2); return;
    case 0xd2: node->kind = M_INT; node->i = (int32_t)mp_be(4); return;
    case 0xd3: node->kind = M_INT; node->i = (int64_t)mp_be(8); return;
    case 0xd9: case 0xc4: n = (size_t)mp_be(1); goto string;
    case 0xda: case 0xc5: n = (size_t)mp_be(2); goto string;
    case 0xdb: case 0xc6: n = (size_t)mp_be(4); goto string;
    case 0xdc: n = (size_t)mp_be(2); goto array;
    case 0xdd: n = (size_t)mp_be(4); goto array;
    default: fail("the request holds a MessagePack type it never sends (0x%02x)", b);
    }
string:
    if ((size_t)(mp_end - mp_at) < n) fail("the request is cut short");
    node->kind = M_STR;
    node->s = (const char *)mp_at;
    node->len = n;
    mp_at += n;
    return;
array:
    if ((size_t)(mp_end - mp_at) < n) fail("the request is cut short"); /* each item is a byte at least */
    node->kind = M_ARR;
    node->len = n;
    node->items = take(sizeof(Node) * (n ? n : 1));
    for (size_t k = 0; k < n; k++) mp_node(&node->items[k], depth + 1);
}

typedef struct {
    char *p;
    size_t len, cap;
} Out;

static void out_room(Out *o, size_t n) { o->p = room(o->p, o->len, &o->cap, o->len + n, 1, 256); }

static void out_bytes(Out *o, const void *b, size_t n) {
    out_room(o, n);
    memcpy(o->p + o->len, b, n);
    o->len += n;
}

static void out_be(Out *o, unsigned char head, uint64_t v, int n) {
    unsigned char b[9];
    b[0] = head;
    for (int k = 0; k < n; k++) b[1 + k] = (unsigned char)(v >> (8 * (n - 1 - k)));
    out_bytes(o, b, (size_t)n + 1);
}

static void out_int(Out *o, int64_t v) {
    if (v >= 0) {
        if (v <= 0x7f) { unsigned char b = (unsigned char)v; out_bytes(o, &b, 1); }
        else if (v <= 0xff) out_be(o, 0xcc, (uint64_t)v, 1);
        else if (v <= 0xffff) out_be(o, 0xcd, (uint64_t)v, 2);
        else if (v <= 0xffffffffLL) out_be(o, 0xce, (uint64_t)v, 4);
        else out_be(o, 0xcf, (uint64_t)v, 8);
    } else if (v >= -32) {
        unsigned char b = (unsigned char)(int8_t)v;
        out_bytes(o, &b, 1);
    } else if (v >= INT8_MIN) out_be(o, 0xd0, (uint64_t)(uint8_t)(int8_t)v, 1);
    else if (v >= INT16_MIN) out_be(o, 0xd1, (uint64_t)(uint16_t)(int16_t)v, 2);
    else if (v >= INT32_MIN) out_be(o, 0xd2, (uint64_t)(uint32_t)(int32_t)v, 4);
    else out_be(o, 0xd3, (uint64_t)v, 8);
}

static void out_str(Out *o, const char *s, size_t n) {
    if (n < 32) { unsigned char b = (unsigned char)(0xa0 | n); out_bytes(o, &b, 1); }
    else if (n <= 0xff) out_be(o, 0xd9, n, 1);
    else if (n <= 0xffff) out_be(o, 0xda, n, 2);
    else out_be(o, 0xdb, n, 4);
    out_bytes(o, s, n);
}

static void out_array(Out *o, size_t n) {
    if (n < 16) { unsigned char b = (unsigned char)(0x90 | n); out_bytes(o, &b, 1); }
    else if (n <= 0xffff) out_be(o, 0xdc, n, 2);
    else out_be(o, 0xdd, n, 4);
}

/* A list of answered values (the script's flat tables), packed as an array at the end. */
typedef struct {
    Out body;
    size_t count;
} List;

static void list_int(List *l, int64_t v) { out_int(&l->body, v); l->count++; }
static void list_str(List *l, const char *s, size_t n) { out_str(&l->body, s, n); l->count++; }
static void list_num(List *l, num v) { /* the script's h.out: an integer below 2^53, else its text */
    if (v < EXACT && v > -EXACT) {
        list_int(l, (int64_t)v);
    } else {
        char buf[48];
        size_t n = num_text(v, buf);
        list_str(l, buf, n);
    }
}
static void list_pack(Out *o, List *l, int given) { /* 0 for a part with nothing to say */
    if (!given) { out_int(o, 0); return; }
    out_array(o, l->count);
    out_bytes(o, l->body.p, l->body.len);
}

/* -- commands called from the module ------------------------------------------------------------------ */

static RedisModuleCtx *ctx;
static RedisModuleString **argv_;
static int numkeys;
#define KEY(index) (argv_[2 + (index)]) /* KEYS[index], 1-based as in the script */

/* replies the call's values point into, freed when it ends */
static RedisModuleCallReply **kept;
static size_t nkept, capkept;

static void keep(RedisModuleCallReply *r) {
    kept = room(kept, nkept, &capkept, nkept + 1, sizeof *kept, 16);
    kept[nkept++] = r;
}

/* Arguments of one command: RedisModuleStrings made from the call's bytes. Every string made is freed when
   the call ends (also when it fails part way), with the replies. */
typedef struct {
    RedisModuleString **v;
    size_t n, cap;
} Args;

static Args made;

static void arg_push(Args *a, RedisModuleString *s) {
    a->v = room(a->v, a->n, &a->cap, a->n + 1, sizeof *a->v, 16);
    a->v[a->n++] = s;
}

static void arg_bytes(Args *a, const char *s, size_t n) {
    RedisModuleString *str = RedisModule_CreateString(ctx, s, n);
    arg_push(&made, str);
    arg_push(a, str);
}

static void arg_text(Args *a, const char *s) { arg_bytes(a, s, strlen(s)); }

static void arg_key(Args *a, int index) { arg_push(a, KEY(index)); } /* RM_Call holds its own reference */

static void arg_int(Args *a, int64_t v) {
    char buf[24];
    arg_bytes(a, buf, int_text(v, buf));
}

/* g's names (1-based places), each made into a string once a call: the HMGET and the HSET share them */
static RedisModuleString **gnames;

static void arg_gname(Args *a, int64_t pos);

static void arg_num(Args *a, num v) {
    char buf[48];
    size_t n = num_text(v, buf);
    arg_bytes(a, buf, n);
}

static void arg_node(Args *a, const Node *node) { /* a name or value from the request */
    if (node->kind == M_STR) arg_bytes(a, node->s, node->len);
    else if (node->kind == M_INT) arg_int(a, node->i);
    else fail("a name in the request is neither a string nor a number");
}

/* Runs the command in a; writes are replicated. The reply is kept until the call ends. */
static RedisModuleCallReply *run(const char *name, Args *a, int write) {
    RedisModuleCallReply *r = RedisModule_Call(ctx, name, write ? "!Cv" : "Cv", a->v, a->n);
    a->n = 0;
    if (!r) fail("%s could not run", name);
    keep(r);
    if (RedisModule_CallReplyType(r) == RM_REPLY_ERROR) {
        size_t n;
        const char *s = RedisModule_CallReplyStringPtr(r, &n);
        fail("%s: %.*s", name, (int)(n > 200 ? 200 : n), s);
    }
    return r;
}

static Args args; /* the one being built */

static const char *reply_str(RedisModuleCallReply *r, size_t *n) { /* NULL for a nil */
    if (!r || RedisModule_CallReplyType(r) != RM_REPLY_STRING) return NULL;
    return RedisModule_CallReplyStringPtr(r, n);
}

/* -- the call's state (the script's locals) ------------------------------------------------------------ */

#define ROLLING 60
#define FORGET_ROLLING 86400
#define RENEW 3600

static int64_t now_s;
static const Node *G, *C; /* the request's g and c */
static size_t count;      /* counters in c */

typedef struct {
    int64_t second;
    int state; /* 0: none (the script's false), 1: a value */
    num value;
} Bucket;

typedef struct {
    int present;
    /* a fixed window */
    num u, v;
    int w;
    /* a rolling window */
    int64_t h, o, e;
    int has_o, has_n, fresh;
    num t, n;
    Bucket *b; /* seconds this call knows (besides now_s): read, made or gone */
    size_t nb, capb;
    int64_t *s; /* the seconds of its buckets, ascending, once read */
    size_t ns, caps;
    int s_read;
    int ch, ct, co, ce, cn, cs;
    int64_t *cb; /* seconds whose buckets changed */
    size_t ncb, capcb;
    int refresh;
} Counter;

static Counter *CT;

typedef struct { /* per key index of the call, 1-based */
    int has_due, due_new, has_life;
    int64_t due, life;
    Args adds; /* score, member, ... for ZADD */
    Args out;  /* field, value, ... for HSET */
} PerKey;

static PerKey *PK;

/* c's values for counter i (0-based): its counters hash's index, the place of its first name in g (1-based),
   the place of its first value among those read (1-based), its end (0: rolling), its key (rolling) */
#define C_INDEX(i) ((int)C->items[5 * (i)].i)
#define C_NAME(i) (C->items[5 * (i) + 1].i)
#define C_VALUE(i) (C->items[5 * (i) + 2].i)
#define C_END(i) (C->items[5 * (i) + 3].i)
#define C_KEY(i) (&C->items[5 * (i) + 4])
#define G_NAME(pos) (&G->items[(pos)-1]) /* g's item at a 1-based place */
#define IS_FIXED(i) (C->items[5 * (i) + 4].kind == M_INT)

static void arg_gname(Args *a, int64_t pos) {
    if (pos < 1 || (size_t)pos > G->len) fail("a name's place out of g");
    RedisModuleString *str = gnames[pos - 1];
    if (!str) {
        const Node *name = &G->items[pos - 1];
        if (name->kind != M_STR) fail("a name in g is not a string");
        str = gnames[pos - 1] = RedisModule_CreateString(ctx, name->s, name->len);
        arg_push(&made, str);
    }
    arg_push(a, str);
}

static num node_num(const Node *x) { /* the script's val(): a request value */
    if (x->kind == M_INT) return x->i;
    num v;
    if (x->kind != M_STR || !parse_num(x->s, x->len, &v)) fail("an amount in the request is not an integer");
    return v;
}

static num stored_num(const char *s, size_t n) {
    num v;
    if (!parse_num(s, n, &v)) fail("a stored counter is not an integer: %.*s", (int)(n > 40 ? 40 : n), s);
    return v;
}

static int counter_index(const Node *x) {
    if (x->kind != M_INT || x->i < 1 || (size_t)x->i > count) fail("a counter number out of range");
    return (int)x->i - 1;
}

static int key_index(const Node *x) {
    if (x->kind != M_INT || x->i < 1 || x->i > numkeys) fail("a key index out of range");
    return (int)x->i;
}

static void bucket_name(Args *a, int i, int64_t second) {
    const Node *key = C_KEY(i);
    size_t n = key->len + 24;
    char *buf = take(n);
    buf[0] = 'b';
    size_t k = 1 + int_text(second, buf + 1);
    buf[k++] = ':';
    memcpy(buf + k, key->s, key->len);
    arg_bytes(a, buf, k + key->len);
}

static void prefixed(Args *a, const char *prefix, const Node *name) {
    size_t p = strlen(prefix);
    char *buf = take(p + name->len + 1);
    memcpy(buf, prefix, p);
    memcpy(buf + p, name->s, name->len);
    arg_bytes(a, buf, p + name->len);
}

/* -- rolling windows (the script's rare paths; memory.py's Rolling) ------------------------------------ */

static Bucket *bucket_find(Counter *st, int64_t second) {
    for (size_t k = 0; k < st->nb; k++)
        if (st->b[k].second == second) return &st->b[k];
    return NULL;
}

static Bucket *bucket_put(Counter *st, int64_t second, int state, num value) {
    Bucket *found = bucket_find(st, second);
    if (!found) {
        st->b = room(st->b, st->nb, &st->capb, st->nb + 1, sizeof *st->b, 8);
        found = &st->b[st->nb++];
        found->second = second;
    }
    found->state = state;
    found->value = value;
    return found;
}

static void push_second(int64_t **list, size_t *n, size_t *cap, int64_t second) {
    *list = room(*list, *n, cap, *n + 1, sizeof **list, 8);
    (*list)[(*n)++] = second;
}

/* the seconds of rolling window i's buckets (ascending), read on first need */
static void seconds(Counter *st, int i) {
    if (st->s_read) return;
    st->s_read = 1;
    st->ns = 0;
    if (st->fresh) return;
    arg_key(&args, C_INDEX(i));
    prefixed(&args, "s:", C_KEY(i));
    size_t n;
    const char *raw = reply_str(run("HGET", &args, 0), &n);
    if (!raw) return;
    size_t k = 0;
    while (k < n) {
        while (k < n && (raw[k] < '0' || raw[k] > '9')) k++;
        size_t start = k;
        while (k < n && raw[k] >= '0' && raw[k] <= '9') k++;
        if (k > start) push_second(&st->s, &st->ns, &st->caps, parse_int(raw + start, k - start));
    }
}

/* the amount in one second's bucket (not now_s): 1 and *value, or 0 when there is none */
static int bucket(Counter *st, int i, int64_t second, num *value) {
    Bucket *found = bucket_find(st, second);
    if (!found) {
        if (st->fresh) {
            found = bucket_put(st, second, 0, 0);
        } else {
            arg_key(&args, C_INDEX(i));
            bucket_name(&args, i, second);
            size_t n;
            const char *raw = reply_str(run("HGET", &args, 0), &n);
            found = raw ? bucket_put(st, second, 1, stored_num(raw, n)) : bucket_put(st, second, 0, 0);
        }
    }
    *value = found->value;
    return found->state;
}

static void note_second(Counter *st, int i, int64_t second) {
    seconds(st, i);
    if (st->ns == 0 || st->s[st->ns - 1] < second) {
        push_second(&st->s, &st->ns, &st->caps, second);
    } else {
        push_second(&st->s, &st->ns, &st->caps, second);
        size_t j = st->ns - 1;
        while (j >= 1 && st->s[j - 1] > second) {
            st->s[j] = st->s[j - 1];
            j--;
        }
        st->s[j] = second;
    }
    st->cs = 1;
}

static void changed_bucket(Counter *st, int64_t second, int on) {
    for (size_t k = 0; k < st->ncb; k++)
        if (st->cb[k] == second) {
            if (!on) st->cb[k] = st->cb[--st->ncb];
            return;
        }
    if (on) push_second(&st->cb, &st->ncb, &st->capcb, second);
}

static void prune_buckets(Counter *st, int i) {
    seconds(st, i);
    int64_t horizon = st->h;
    size_t gone = 0;
    while (gone < st->ns && st->s[gone] <= horizon) gone++;
    if (gone == 0) return;
    Args names = {0};
    Args unknown = {0};
    arg_key(&unknown, C_INDEX(i));
    for (size_t j = 0; j < gone; j++) {
        int64_t second = st->s[j];
        bucket_name(&names, i, second);
        Bucket *known = second == now_s ? NULL : bucket_find(st, second);
        if (second == now_s) {
            if (st->has_n) st->t -= st->n;
        } else if (!known) {
            bucket_name(&unknown, i, second);
        } else if (known->state) {
            st->t -= known->value;
        }
        if (second != now_s) bucket_put(st, second, 0, 0);
        changed_bucket(st, second, 0);
    }
    if (unknown.n > 1) {
        RedisModuleCallReply *raw = run("HMGET", &unknown, 0);
        size_t len = RedisModule_CallReplyLength(raw);
        for (size_t j = 0; j < len; j++) {
            size_t n;
            const char *s = reply_str(RedisModule_CallReplyArrayElement(raw, j), &n);
            if (s) st->t -= stored_num(s, n);
        }
    }
    Args del = {0};
    arg_key(&del, C_INDEX(i));
    for (size_t k = 0; k < names.n; k++) arg_push(&del, names.v[k]);
    run("HDEL", &del, 1);
    memmove(st->s, st->s + gone, sizeof *st->s * (st->ns - gone));
    st->ns -= gone;
    st->cs = st->ct = 1;
    st->has_o = st->ns > 0;
    st->o = st->has_o ? st->s[0] : 0;
    st->co = 1;
}

static void prune(Counter *st, int i) {
    st->h = now_s - ROLLING;
    st->ch = 1;
    if (st->has_o && st->o <= st->h) prune_buckets(st, i);
}

static int64_t rolling_retry_after(Counter *st, int i, num amount, num maximum) {
    if (amount > maximum) return ROLLING;
    num wanted = st->t + amount;
    int over = wanted > maximum;
    num excess = wanted - maximum;
    seconds(st, i);
    if (!st->fresh) { /* the buckets this call has not read: one HMGET */
        Args names = {0};
        int64_t *which = take(sizeof *which * (st->ns ? st->ns : 1));
        size_t nw = 0;
        arg_key(&names, C_INDEX(i));
        for (size_t j = 0; j < st->ns; j++) {
            int64_t second = st->s[j];
            if (second != now_s && !bucket_find(st, second)) {
                which[nw++] = second;
                bucket_name(&names, i, second);
            }
        }
        if (nw) {
            RedisModuleCallReply *raw = run("HMGET", &names, 0);
            for (size_t j = 0; j < nw; j++) {
                size_t n;
                const char *s = reply_str(RedisModule_CallReplyArrayElement(raw, j), &n);
                if (s) bucket_put(st, which[j], 1, stored_num(s, n));
                else bucket_put(st, which[j], 0, 0);
            }
        }
    }
    for (size_t j = 0; j < st->ns; j++) {
        int64_t second = st->s[j];
        num value = 0;
        if (second == now_s) {
            if (st->has_n) value = st->n;
        } else if (!bucket(st, i, second, &value)) {
            value = 0;
        }
        excess -= value;
        if (excess <= 0 && (over || value > 0)) {
            int64_t retry = second + ROLLING - now_s;
            return retry > 1 ? retry : 1;
        }
    }
    return ROLLING;
}

/* memory.py Rolling.add; 1 when it changed something */
static int rolling_add(Counter *st, int i, int64_t second, num amount) {
    if (second <= st->h) return 0;
    int has;
    num value = 0;
    if (second == now_s) {
        has = st->has_n;
        value = st->n;
    } else {
        has = bucket(st, i, second, &value);
    }
    if (!has && amount == 0) return 0;
    if (!has) note_second(st, i, second);
    value = has ? value + amount : amount;
    if (second == now_s) {
        st->n = value;
        st->has_n = 1;
        st->cn = 1;
    } else {
        bucket_put(st, second, 1, value);
        changed_bucket(st, second, 1);
    }
    st->t += amount;
    st->ct = 1;
    if (!st->has_o || second < st->o) {
        st->o = second;
        st->has_o = 1;
        st->co = 1;
    }
    return 1;
}

/* the level of counter i, {consumed, reset} */
static void level(int i, List *into) {
    Counter *st = &CT[i];
    if (IS_FIXED(i)) {
        list_num(into, st->u + st->v);
        list_int(into, C_END(i));
        return;
    }
    if (now_s - ROLLING > st->h) prune(st, i);
    list_num(into, st->t);
    list_int(into, st->has_o ? st->o + ROLLING : now_s);
}

static void forget_at(int i, int64_t at, const char *prefix, const Node *rest) {
    int index = C_INDEX(i);
    PerKey *pk = &PK[index];
    arg_int(&pk->adds, at);
    prefixed(&pk->adds, prefix, rest);
    if (!pk->has_due || at < pk->due) {
        pk->has_due = 1;
        pk->due = at;
        pk->due_new = 1;
    }
}

static void seed(const Node *item) {
    if (item->kind != M_ARR || item->len < 1) fail("a malformed seed");
    int i = counter_index(&item->items[0]);
    Counter *st = &CT[i];
    if (IS_FIXED(i)) {
        if (st->present || item->len < 3) return;
        st->present = 1;
        st->u = node_num(&item->items[1]);
        st->v = 0;
        st->w = 1;
        int index = C_INDEX(i);
        int64_t left = item->items[2].i;
        if (!PK[index].has_life || PK[index].life < left) {
            PK[index].has_life = 1;
            PK[index].life = left;
        }
        const Node *name = G_NAME(C_NAME(i)); /* "u<end>:<key>": remembered as "f<end>:<key>" */
        Node rest = *name;
        rest.s += 1;
        rest.len -= 1;
        forget_at(i, now_s + left, "f", &rest);
        return;
    }
    if (st->present) return;
    memset(st, 0, sizeof *st);
    st->present = st->fresh = st->s_read = 1;
    st->ch = st->ct = st->cs = 1;
    for (size_t j = 1; j + 1 < item->len; j += 2) {
        int64_t second = item->items[j].i;
        if (second > now_s - ROLLING) rolling_add(st, i, second, node_num(&item->items[j + 1]));
    }
    st->refresh = 1;
}

/* forgets the counters of one group whose time has passed, before the call reads them */
static void forget(int index) {
    char bound[32];
    bound[0] = '(';
    int_text(now_s, bound + 1);
    arg_key(&args, index + 1);
    arg_text(&args, "-inf");
    arg_text(&args, bound);
    RedisModuleCallReply *due = run("ZRANGEBYSCORE", &args, 0);
    size_t ndue = RedisModule_CallReplyLength(due);
    Args again = {0};
    arg_key(&again, index + 1);
    for (size_t j = 0; j < ndue; j++) {
        size_t n;
        const char *member = reply_str(RedisModule_CallReplyArrayElement(due, j), &n);
        if (!member || n < 2) continue;
        if (member[0] == 'f') {
            char *name = take(n + 1);
            memcpy(name + 1, member + 1, n - 1);
            name[0] = 'v';
            arg_key(&args, index);
            arg_bytes(&args, name, n);
            size_t rn;
            const char *reserved = reply_str(run("HGET", &args, 0), &rn);
            if (reserved && !(rn == 1 && reserved[0] == '0')) {
                arg_int(&again, now_s + 3600);
                arg_bytes(&again, member, n);
            } else {
                arg_key(&args, index);
                name[0] = 'u';
                arg_bytes(&args, name, n);
                name[0] = 'v';
                arg_bytes(&args, name, n);
                run("HDEL", &args, 1);
            }
        } else {
            /* "r:<key>" */
            const char *k = member + 2;
            size_t kn = n - 2;
            static const char *kinds[] = {"t:", "h:", "o:", "e:", "s:"};
            Args names = {0};
            arg_key(&names, index);
            for (int m = 0; m < 5; m++) {
                char *buf = take(kn + 3);
                memcpy(buf, kinds[m], 2);
                memcpy(buf + 2, k, kn);
                arg_bytes(&names, buf, kn + 2);
            }
            arg_key(&args, index);
            {
                char *buf = take(kn + 3);
                memcpy(buf, "s:", 2);
                memcpy(buf + 2, k, kn);
                arg_bytes(&args, buf, kn + 2);
            }
            size_t ln;
            const char *list = reply_str(run("HGET", &args, 0), &ln);
            size_t p = 0;
            while (list && p < ln) {
                while (p < ln && (list[p] < '0' || list[p] > '9')) p++;
                size_t start = p;
                while (p < ln && list[p] >= '0' && list[p] <= '9') p++;
                if (p > start) {
                    char *buf = take((p - start) + kn + 3);
                    buf[0] = 'b';
                    memcpy(buf + 1, list + start, p - start);
                    buf[1 + (p - start)] = ':';
                    memcpy(buf + 2 + (p - start), k, kn);
                    arg_bytes(&names, buf, 2 + (p - start) + kn);
                }
            }
            run("HDEL", &names, 1);
        }
    }
    arg_key(&args, index + 1);
    arg_text(&args, "-inf");
    arg_text(&args, bound);
    run("ZREMRANGEBYSCORE", &args, 1);
    if (again.n > 1) run("ZADD", &again, 1);
    arg_key(&args, index + 1);
    arg_text(&args, "0");
    arg_text(&args, "0");
    arg_text(&args, "WITHSCORES");
    RedisModuleCallReply *first = run("ZRANGE", &args, 0);
    size_t sn = 0;
    const char *score = RedisModule_CallReplyLength(first) >= 2
                            ? reply_str(RedisModule_CallReplyArrayElement(first, 1), &sn)
                            : NULL;
    if (score) {
        arg_key(&args, index);
        arg_text(&args, "w");
        arg_bytes(&args, score, sn);
        run("HSET", &args, 1);
        PK[index].has_due = 1;
        PK[index].due = parse_int(score, sn);
    } else {
        arg_key(&args, index);
        arg_text(&args, "w");
        run("HDEL", &args, 1);
        PK[index].has_due = 0;
    }
}

/* -- the call ------------------------------------------------------------------------------------------ */

typedef struct {
    const char *s;
    size_t n;
} Val;

static int by_expiry(const void *a, const void *b) {
    const int64_t *x = a, *y = b; /* {expires, position} */
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* The values of n names of g (from the 1-based place first) in the hash KEYS[index], NULL where absent.
   (Measured: the module API's HashGet and one HGETALL cost no less: a small hash is a listpack, and
   finding its fields, whichever way, is most of the time.) */
static void read_names(int index, int64_t first, size_t n, Val *out) {
    arg_key(&args, index);
    for (size_t k = 0; k < n; k++) arg_gname(&args, first + (int64_t)k);
    RedisModuleCallReply *raw = run("HMGET", &args, 0);
    for (size_t k = 0; k < n; k++) out[k].s = reply_str(RedisModule_CallReplyArrayElement(raw, k), &out[k].n);
}

#define MAX_REQUEST (8 << 20) /* a request's values take up to 40 times its bytes here */

/* Every part of the request checked before the first command: a malformed call changes nothing. */
static void check_items(const Node *part, size_t least) {
    if (part->kind == M_INT && part->i == 0) return;
    if (part->kind != M_ARR) fail("a part of the request is neither 0 nor a list");
    for (size_t k = 0; k < part->len; k++)
        if (part->items[k].kind != M_ARR || part->items[k].len < least) fail("a malformed item in the request");
}

static void check_id(const Node *id) {
    if (id->kind != M_STR && id->kind != M_INT) fail("a hold id is neither a string nor a number");
}

static void check_request(const Node *R, int argc, int first_arg) {
    check_items(&R[4], 4);
    check_items(&R[5], 1);
    check_items(&R[6], 3);
    check_items(&R[8], 2);
    check_items(&R[9], 2);
    if (R[4].kind == M_ARR)
        for (size_t k = 0; k < R[4].len; k++) {
            const Node *item = &R[4].items[k];
            key_index(&item->items[0]);
            check_id(&item->items[1]);
            const Node *actual = &item->items[3];
            if (actual->kind == M_ARR)
                for (size_t l = 0; l < actual->len; l++) node_num(&actual->items[l]);
            else if (actual->kind != M_INT) fail("a finish's amounts are neither 0 nor a list");
            for (size_t l = 0; 5 + 2 * l < item->len; l++) {
                counter_index(&item->items[4 + 2 * l]);
                node_num(&item->items[5 + 2 * l]);
            }
        }
    if (R[5].kind == M_ARR)
        for (size_t k = 0; k < R[5].len; k++) {
            const Node *item = &R[5].items[k];
            int i = counter_index(&item->items[0]);
            if (IS_FIXED(i) && (item->len < 3 || item->items[2].kind != M_INT)) fail("a malformed seed");
            for (size_t j = 1; j < item->len; j++) node_num(&item->items[j]);
        }
    if (R[6].kind == M_ARR)
        for (size_t k = 0; k < R[6].len; k++) {
            const Node *hold = &R[6].items[k];
            key_index(&hold->items[0]);
            check_id(&hold->items[1]);
            int64_t record = hold->items[2].i;
            if (hold->items[2].kind != M_INT || record < 1 || record > argc - first_arg)
                fail("a hold's record is missing");
            for (size_t l = 1; 4 * l + 2 < hold->len; l++) {
                counter_index(&hold->items[4 * l - 1]);
                node_num(&hold->items[4 * l]);
                node_num(&hold->items[4 * l + 1]);
            }
        }
    if (R[7].kind == M_ARR)
        for (size_t k = 0; k < R[7].len; k++) counter_index(&R[7].items[k]);
    else if (R[7].kind != M_INT) fail("the request's levels are neither 0 nor a list");
    if (R[8].kind == M_ARR)
        for (size_t k = 0; k < R[8].len; k++) {
            key_index(&R[8].items[k].items[0]);
            check_id(&R[8].items[k].items[1]);
        }
    if (R[9].kind == M_ARR)
        for (size_t k = 0; k < R[9].len; k++) key_index(&R[9].items[k].items[0]);
    if (R[10].kind != M_INT) fail("the request's tally is not a key index");
    if (R[10].i != 0) key_index(&R[10]);
}

static void done(void) { /* the call's strings, replies and memory freed */
    for (size_t k = 0; k < made.n; k++) RedisModule_FreeString(ctx, made.v[k]);
    for (size_t k = 0; k < nkept; k++) RedisModule_FreeCallReply(kept[k]);
    arena_reset();
}

/* On a cluster, Redis checks a call's first key only (RedisModule_OnLoad): the rest are checked here, before
   anything runs, as a script's declared keys are. A key this node does not hold now (its slot moving) is
   answered TRYAGAIN, never a call that stops half-way when a command meets it. */
static int numkeys_here(RedisModuleCtx *c, RedisModuleString **argv, int n) {
    if (n < 2 || !(RedisModule_GetContextFlags(c) & RM_CTX_FLAGS_CLUSTER)) return RM_OK;
    errno = 0;
    RedisModuleCallReply *r = RedisModule_Call(c, "EXISTS", "v", argv + 3, (size_t)n);
    if (r) {
        RedisModule_FreeCallReply(r);
        return RM_OK;
    }
    if (errno == ENETDOWN || errno == EROFS) RedisModule_ReplyWithError(c, "CLUSTERDOWN the cluster is down");
    else RedisModule_ReplyWithError(c, "TRYAGAIN the keys of this call are not all on this node now (a slot moving)");
    return RM_ERR;
}

static int counters_call(RedisModuleCtx *c, RedisModuleString **argv, int argc) {
    if (argc < 4) return RedisModule_WrongArity(c);
    {
        size_t len;
        const char *sha = RedisModule_StringPtrLen(argv[1], &len);
        if (len != sizeof(METERLINE_SCRIPT_SHA) - 1 || memcmp(sha, METERLINE_SCRIPT_SHA, len) != 0)
            return RedisModule_ReplyWithError(
                c, "METERLINE-VERSION this module counts for the script " METERLINE_SCRIPT_SHA
                   " (build it again with `meterline redis-module` of the version that calls it)");
    }
    num nk;
    {
        size_t len;
        const char *s = RedisModule_StringPtrLen(argv[2], &len);
        if (!parse_num(s, len, &nk) || nk < 0 || nk > argc - 4)
            return RedisModule_ReplyWithError(c, "ERR meterline counters: a wrong number of keys");
    }
    if (numkeys_here(c, argv, (int)nk) != RM_OK) return RM_OK; /* answered: not here now */
    ctx = c;
    numkeys = (int)nk;
    argv_ = argv; /* argv: the command, the SHA-1, numkeys, KEYS[1..numkeys], ARGV[1], ... */
    int first_arg = 3 + numkeys; /* ARGV[1] */
    nkept = capkept = 0;
    kept = NULL;
    args.n = args.cap = 0;
    args.v = NULL;
    made.n = made.cap = 0;
    made.v = NULL;
    if (setjmp(fail_at)) {
        done();
        return RedisModule_ReplyWithError(c, fail_text);
    }

    Node req;
    {
        size_t len;
        const char *s = RedisModule_StringPtrLen(argv[first_arg], &len);
        if (len > MAX_REQUEST) fail("a request larger than any call Meterline makes (%d bytes)", MAX_REQUEST);
        mp_at = (const unsigned char *)s;
        mp_end = mp_at + len;
        mp_node(&req, 0);
    }
    if (req.kind != M_ARR || req.len < 11) fail("the request is not the script's array of 11 parts");
    const Node *R = req.items;
    now_s = R[0].i;
    G = &R[2];
    C = &R[3];
    if (G->kind != M_ARR || C->kind != M_ARR) fail("the request's g and c are not arrays");
    count = C->len / 5;
    for (size_t i = 0; i < count; i++) { /* its hash a key of the call (its windows the next), its names in g */
        if (C->items[5 * i].kind != M_INT || C->items[5 * i].i < 1 || C->items[5 * i].i >= numkeys)
            fail("a counter's key index out of range");
        int64_t at = C_NAME(i), names = IS_FIXED(i) ? 2 : 5;
        if (at < 1 || at > (int64_t)G->len || (int64_t)G->len - at + 1 < names || G_NAME(at)->kind != M_STR ||
            G_NAME(at)->len < 1)
            fail("a counter's names out of g");
    }
    gnames = take(sizeof *gnames * (G->len ? G->len : 1));
    memset(gnames, 0, sizeof *gnames * (G->len ? G->len : 1));
    CT = take(sizeof *CT * (count ? count : 1));
    memset(CT, 0, sizeof *CT * (count ? count : 1));
    PK = take(sizeof *PK * ((size_t)numkeys + 2));
    memset(PK, 0, sizeof *PK * ((size_t)numkeys + 2));
    check_request(R, argc, first_arg);

    /* reading: one read per group, its due time first (forgetting comes before reading) */
    size_t nvals = 0, capvals = 0;
    Val *vals = NULL;
    for (size_t at = 0; at + 1 < G->len;) {
        int index = key_index(&G->items[at]);
        if (index + 1 > numkeys) fail("a group's windows key is missing");
        const Node *count_of = &G->items[at + 1];
        if (count_of->kind != M_INT || count_of->i < 1 || (size_t)count_of->i > G->len - at - 2)
            fail("a group's names run past g");
        size_t n = (size_t)count_of->i;
        vals = room(vals, nvals, &capvals, nvals + n, sizeof *vals, 64);
        for (int pass = 1; pass <= 2; pass++) {
            read_names(index, at + 3, n, vals + nvals);
            const Val *due = &vals[nvals];
            PK[index].has_due = due->s != NULL;
            if (due->s) PK[index].due = parse_int(due->s, due->n);
            if (!(due->s && now_s > PK[index].due) || pass == 2) break;
            forget(index);
        }
        nvals += n;
        at += 2 + n;
    }
    for (size_t i = 0; i < count; i++) {
        size_t p = (size_t)C_VALUE(i); /* 1-based */
        Counter *st = &CT[i];
        if (IS_FIXED(i)) {
            if (p < 1 || p > nvals || nvals - p < 1) fail("a counter's values run past those read");
            Val used = vals[p - 1], reserved = vals[p];
            if (used.s) {
                st->present = 1;
                st->u = stored_num(used.s, used.n);
                st->v = reserved.s ? stored_num(reserved.s, reserved.n) : 0;
            }
        } else {
            if (C_KEY(i)->kind != M_STR) fail("a rolling window's key is not a string");
            if (p < 1 || p > nvals || nvals - p < 4) fail("a counter's values run past those read");
            Val t = vals[p - 1], h = vals[p], o = vals[p + 1], e = vals[p + 2], here = vals[p + 3];
            if (h.s) {
                st->present = 1;
                st->h = parse_int(h.s, h.n);
                st->t = t.s ? stored_num(t.s, t.n) : 0;
                st->has_o = o.s != NULL;
                st->o = o.s ? parse_int(o.s, o.n) : 0;
                st->e = e.s ? parse_int(e.s, e.n) : 0;
                st->has_n = here.s != NULL;
                st->n = here.s ? stored_num(here.s, here.n) : 0;
            }
        }
    }

    /* finishing: settle / release; unknown holds are skipped */
    List malformed = {0};
    int any_malformed = 0;
    if (R[4].kind == M_ARR) {
        for (size_t k = 0; k < R[4].len; k++) {
            const Node *item = &R[4].items[k];
            if (item->kind != M_ARR || item->len < 4) fail("a malformed finish");
            arg_key(&args, key_index(&item->items[0]));
            arg_node(&args, &item->items[1]);
            if (RedisModule_CallReplyInteger(run("HDEL", &args, 1)) != 1) continue;
            int64_t second = item->items[2].i;
            const Node *actual = &item->items[3];
            size_t lines = (item->len - 4) / 2;
            if (actual->kind == M_ARR && actual->len != lines) {
                any_malformed = 1;
                if (item->items[1].kind == M_INT) list_int(&malformed, item->items[1].i);
                else list_str(&malformed, item->items[1].s, item->items[1].len);
                continue;
            }
            for (size_t l = 0; l < lines; l++) {
                int i = counter_index(&item->items[4 + 2 * l]);
                num reserved = node_num(&item->items[5 + 2 * l]);
                num spent = actual->kind == M_ARR ? node_num(&actual->items[l]) : 0;
                Counter *st = &CT[i];
                if (!st->present) continue;
                if (IS_FIXED(i)) {
                    st->v -= reserved;
                    st->u += spent;
                    st->w = 1;
                } else {
                    rolling_add(st, i, second, spent - reserved);
                }
            }
        }
    }

    /* seeding */
    if (R[5].kind == M_ARR)
        for (size_t k = 0; k < R[5].len; k++) seed(&R[5].items[k]);

    /* reserving: each hold all-or-nothing, in order */
    List verdicts = {0};
    int64_t duplicate = -1;
    if (R[6].kind == M_ARR) {
        num *consumed = NULL;
        size_t capconsumed = 0;
        for (size_t j = 0; j < R[6].len; j++) {
            const Node *hold = &R[6].items[j];
            if (hold->kind != M_ARR || hold->len < 3) fail("a malformed hold");
            int holds = key_index(&hold->items[0]);
            const Node *id = &hold->items[1];
            int64_t record = hold->items[2].i;
            if (record < 1 || record > argc - first_arg) fail("a hold's record is missing");
            /* claim the id first; given back unless admitted */
            arg_key(&args, holds);
            arg_node(&args, id);
            arg_push(&args, argv[first_arg - 1 + record]);
            if (RedisModule_CallReplyInteger(run("HSETNX", &args, 1)) == 0) {
                duplicate = (int64_t)j;
                break;
            }
            size_t lines = (hold->len - 3) / 4;
            if (lines > capconsumed) {
                capconsumed = lines * 2;
                consumed = take(sizeof *consumed * capconsumed);
            }
            size_t missing = 0; /* 1-based */
            for (size_t l = 1; l <= lines; l++) {
                int i = counter_index(&hold->items[4 * l - 1]);
                if (!CT[i].present) {
                    missing = l;
                    break;
                }
            }
            List v = {0};
            if (missing) {
                arg_key(&args, holds);
                arg_node(&args, id);
                run("HDEL", &args, 1);
                /* memory.py checks lines in order: the rolling lines before the first missing one were pruned */
                for (size_t l = 1; l < missing; l++) {
                    int i = counter_index(&hold->items[4 * l - 1]);
                    if (!IS_FIXED(i) && now_s - ROLLING > CT[i].h) prune(&CT[i], i);
                }
                list_int(&v, 2);
                for (size_t l = 1; l <= lines; l++) {
                    int i = counter_index(&hold->items[4 * l - 1]);
                    if (!CT[i].present) list_int(&v, (int64_t)l - 1);
                }
            } else {
                int overage = 0;
                size_t refused = 0;
                for (size_t l = 1; l <= lines; l++) {
                    size_t b = 4 * l - 1; /* 0-based place of the line's counter */
                    int i = counter_index(&hold->items[b]);
                    Counter *st = &CT[i];
                    num value;
                    if (IS_FIXED(i)) {
                        value = st->u + st->v;
                    } else {
                        if (now_s - ROLLING > st->h) prune(st, i);
                        value = st->t;
                    }
                    consumed[l - 1] = value;
                    num amount = node_num(&hold->items[b + 1]), maximum = node_num(&hold->items[b + 2]);
                    if (maximum >= 0 && amount > 0 && value + amount > maximum) {
                        if (hold->items[b + 3].i == 0) overage = 1;
                        else if (!refused) refused = l;
                    }
                }
                if (refused) {
                    arg_key(&args, holds);
                    arg_node(&args, id);
                    run("HDEL", &args, 1);
                    size_t b = 4 * refused - 1;
                    int i = counter_index(&hold->items[b]);
                    int64_t retry;
                    if (IS_FIXED(i)) {
                        retry = C_END(i) - now_s;
                        if (retry < 1) retry = 1;
                    } else {
                        retry = rolling_retry_after(&CT[i], i, node_num(&hold->items[b + 1]),
                                                    node_num(&hold->items[b + 2]));
                    }
                    list_int(&v, 3);
                    list_int(&v, (int64_t)refused - 1);
                    list_int(&v, retry);
                    for (size_t l = 1; l <= lines; l++) level(counter_index(&hold->items[4 * l - 1]), &v);
                } else {
                    /* As memory.py: each line's level is its consumption as checked plus its own amount; the
                       reset is read after this line's write. */
                    list_int(&v, 1);
                    list_int(&v, overage);
                    for (size_t l = 1; l <= lines; l++) {
                        size_t b = 4 * l - 1;
                        int i = counter_index(&hold->items[b]);
                        num amount = node_num(&hold->items[b + 1]);
                        Counter *st = &CT[i];
                        list_num(&v, consumed[l - 1] + amount);
                        if (IS_FIXED(i)) {
                            if (amount != 0) {
                                st->v += amount;
                                st->w = 1;
                            }
                            list_int(&v, C_END(i));
                        } else {
                            if (rolling_add(st, i, now_s, amount)) st->refresh = 1;
                            list_int(&v, st->has_o ? st->o + ROLLING : now_s);
                        }
                    }
                }
            }
            list_int(&verdicts, (int64_t)v.count);
            out_bytes(&verdicts.body, v.body.p, v.body.len);
            verdicts.count += v.count;
        }
    }

    /* reading levels, records, expired holds, a tally */
    List levels = {0};
    if (R[7].kind == M_ARR) {
        for (size_t k = 0; k < R[7].len; k++) {
            int i = counter_index(&R[7].items[k]);
            if (CT[i].present) {
                list_int(&levels, 1);
                level(i, &levels);
            } else {
                list_int(&levels, 0);
                list_int(&levels, 0);
                list_int(&levels, 0);
            }
        }
    }
    List records = {0};
    if (R[8].kind == M_ARR) {
        for (size_t k = 0; k < R[8].len; k++) {
            const Node *item = &R[8].items[k];
            if (item->kind != M_ARR || item->len < 2) fail("a malformed record to read");
            arg_key(&args, key_index(&item->items[0]));
            arg_node(&args, &item->items[1]);
            size_t n;
            const char *s = reply_str(run("HGET", &args, 0), &n);
            if (s) list_str(&records, s, n);
            else list_int(&records, 0);
        }
    }
    List due = {0};
    if (R[9].kind == M_ARR) {
        num bound;
        if (R[1].kind != M_STR || !parse_num(R[1].s, R[1].len, &bound)) fail("the request's u is not a number");
        for (size_t k = 0; k < R[9].len; k++) {
            const Node *item = &R[9].items[k];
            if (item->kind != M_ARR || item->len < 2) fail("a malformed expired-holds query");
            arg_key(&args, key_index(&item->items[0]));
            RedisModuleCallReply *fields = run("HGETALL", &args, 0);
            size_t nf = RedisModule_CallReplyLength(fields) / 2;
            int64_t *order = take(sizeof *order * 2 * (nf ? nf : 1));
            size_t nd = 0;
            for (size_t f = 0; f < nf; f++) {
                size_t n;
                const char *value = reply_str(RedisModule_CallReplyArrayElement(fields, 2 * f + 1), &n);
                if (!value || n < 2 || value[0] != '[') continue;
                size_t e = 1;
                while (e < n && value[e] >= '0' && value[e] <= '9') e++;
                if (e == 1) continue;
                num expires;
                if (!parse_num(value + 1, e - 1, &expires)) continue;
                if (expires < bound) {
                    order[2 * nd] = (int64_t)expires;
                    order[2 * nd + 1] = (int64_t)f;
                    nd++;
                }
            }
            qsort(order, nd, 2 * sizeof *order, by_expiry);
            int64_t limit = item->items[1].i;
            for (size_t d = 0; d < nd && (int64_t)d < limit; d++) {
                size_t f = (size_t)order[2 * d + 1], n;
                const char *field = reply_str(RedisModule_CallReplyArrayElement(fields, 2 * f), &n);
                list_str(&due, field, n);
                const char *value = reply_str(RedisModule_CallReplyArrayElement(fields, 2 * f + 1), &n);
                list_str(&due, value, n);
                list_int(&due, (int64_t)k);
            }
        }
    }
    int64_t tallied = 0;
    if (R[10].kind == M_INT && R[10].i != 0) {
        int index = key_index(&R[10]);
        int64_t minute = now_s >= 0 ? now_s / 60 : -((-now_s + 59) / 60);
        arg_key(&args, index);
        arg_int(&args, minute);
        arg_text(&args, "1");
        run("HINCRBY", &args, 1);
        arg_key(&args, index);
        RedisModuleCallReply *fields = run("HGETALL", &args, 0);
        size_t nf = RedisModule_CallReplyLength(fields) / 2;
        Args gone = {0};
        arg_key(&gone, index);
        for (size_t f = 0; f < nf; f++) {
            size_t n, vn;
            const char *field = reply_str(RedisModule_CallReplyArrayElement(fields, 2 * f), &n);
            const char *value = reply_str(RedisModule_CallReplyArrayElement(fields, 2 * f + 1), &vn);
            if (parse_int(field, n) <= minute - 60) arg_bytes(&gone, field, n);
            else tallied += parse_int(value, vn);
        }
        if (gone.n > 1) run("HDEL", &gone, 1);
        arg_key(&args, index);
        arg_int(&args, 61 * 60);
        run("EXPIRE", &args, 1);
    }

    /* the writes: one HSET per group */
    for (size_t i = 0; i < count; i++) {
        Counter *st = &CT[i];
        int index = C_INDEX(i);
        int64_t at = C_NAME(i);
        Args *o = &PK[index].out;
        if (IS_FIXED(i)) {
            if (st->w) {
                arg_gname(o, at);
                arg_num(o, st->u);
                arg_gname(o, at + 1);
                arg_num(o, st->v);
            }
            continue;
        }
        if (!st->present) continue;
        if (st->refresh && now_s - st->e >= RENEW) {
            st->e = now_s;
            st->ce = 1;
            forget_at((int)i, now_s + FORGET_ROLLING, "r:", C_KEY(i));
            if (!PK[index].has_life || PK[index].life < FORGET_ROLLING + RENEW) {
                PK[index].has_life = 1;
                PK[index].life = FORGET_ROLLING + RENEW;
            }
        }
        if (st->ct) {
            arg_gname(o, at);
            arg_num(o, st->t);
        }
        if (st->ch) {
            arg_gname(o, at + 1);
            arg_int(o, st->h);
        }
        if (st->cn) {
            arg_gname(o, at + 4);
            arg_num(o, st->n);
        }
        if (st->co) {
            if (st->has_o) {
                arg_gname(o, at + 2);
                arg_int(o, st->o);
            } else {
                arg_key(&args, index);
                arg_gname(&args, at + 2);
                run("HDEL", &args, 1);
            }
        }
        if (st->ce) {
            arg_gname(o, at + 3);
            arg_int(o, st->e);
        }
        for (size_t k = 0; k < st->ncb; k++) {
            Bucket *found = bucket_find(st, st->cb[k]);
            bucket_name(o, (int)i, st->cb[k]);
            arg_num(o, found ? found->value : 0);
        }
        if (st->cs) {
            if (st->ns) {
                prefixed(o, "s:", C_KEY(i));
                char *text = take(st->ns * 21 + 1);
                size_t len = 0;
                for (size_t k = 0; k < st->ns; k++) {
                    if (k) text[len++] = ' ';
                    len += int_text(st->s[k], text + len);
                }
                arg_bytes(o, text, len);
            } else {
                arg_key(&args, index);
                prefixed(&args, "s:", C_KEY(i));
                run("HDEL", &args, 1);
            }
        }
    }
    for (int index = 1; index <= numkeys; index++) {
        PerKey *pk = &PK[index];
        if (pk->due_new) {
            arg_text(&pk->out, "w");
            arg_int(&pk->out, pk->due);
        }
        if (pk->out.n) {
            Args hset = {0};
            arg_key(&hset, index);
            for (size_t k = 0; k < pk->out.n; k++) arg_push(&hset, pk->out.v[k]);
            pk->out.n = 0;
            run("HSET", &hset, 1);
        }
    }
    for (int index = 1; index <= numkeys; index++) {
        PerKey *pk = &PK[index];
        if (!pk->adds.n) continue;
        if (index + 1 > numkeys) fail("a group's windows key is missing");
        Args zadd = {0};
        arg_key(&zadd, index + 1);
        for (size_t k = 0; k < pk->adds.n; k++) arg_push(&zadd, pk->adds.v[k]);
        pk->adds.n = 0;
        run("ZADD", &zadd, 1);
    }
    /* Redis' own lifetime of a group's counters and windows: NX sets a first one, GT lengthens it */
    for (int index = 1; index <= numkeys; index++) {
        if (!PK[index].has_life) continue;
        for (int key = index; key <= index + 1 && key <= numkeys; key++) {
            arg_key(&args, key);
            arg_int(&args, PK[index].life);
            arg_text(&args, "NX");
            run("EXPIRE", &args, 1);
            arg_key(&args, key);
            arg_int(&args, PK[index].life);
            arg_text(&args, "GT");
            run("EXPIRE", &args, 1);
        }
    }

    /* one flat MessagePack value, as the script's */
    Out answer = {0};
    out_array(&answer, 7);
    list_pack(&answer, &verdicts, verdicts.count > 0);
    list_pack(&answer, &levels, R[7].kind == M_ARR);
    list_pack(&answer, &records, R[8].kind == M_ARR);
    list_pack(&answer, &due, R[9].kind == M_ARR);
    out_int(&answer, tallied);
    list_pack(&answer, &malformed, any_malformed);
    out_int(&answer, duplicate);
    RedisModule_ReplyWithStringBuffer(c, answer.p, answer.len);
    done();
    return RM_OK;
}

int RedisModule_OnLoad(RedisModuleCtx *c, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    void *getapi = ((void **)c)[0];
    RedisModule_GetApi = (int (*)(const char *, void *))(unsigned long)getapi;
    if (GET_API(SetModuleAttribs) || GET_API(CreateCommand) || GET_API(WrongArity) || GET_API(GetContextFlags) || GET_API(ReplyWithError) || GET_API(ReplyWithStringBuffer) ||
        GET_API(StringPtrLen) || GET_API(CreateString) || GET_API(FreeString) || GET_API(Call) ||
        GET_API(FreeCallReply) || GET_API(CallReplyType) || GET_API(CallReplyInteger) ||
        GET_API(CallReplyLength) || GET_API(CallReplyArrayElement) || GET_API(CallReplyStringPtr) ||
        GET_API(Alloc) || GET_API(Realloc) || GET_API(Free))
        return RM_ERR;
    RedisModule_SetModuleAttribs(c, "meterline", 1, RM_APIVER_1);
    /* Its first key (argv[3]) is the one Redis Cluster routes and checks by: every key of a call shares
       its organization's hash tag, so its slot. (A key list told through the getkeys-api would make clients
       ask COMMAND GETKEYS of some node for every redirected call: redis-py asks one fixed node, and waits
       on it while it is down.) A key of another slot is refused by the command that touches it. */
    if (RedisModule_CreateCommand(c, "meterline.counters", counters_call, "write deny-oom", 3, 3, 1) != RM_OK)
        return RM_ERR;
    return RM_OK;
}
