/* The prefix index's hot loops in C: keying blocks (events and prompts), storing an event's
 * blocks, and walking a prompt's keys with the pending claims laid over them.
 *
 * Why C: in Python each block costs ~0.3-0.4 us to key and ~0.4 us to walk (interpreter
 * dispatch, and a new int object for every 64-bit AND). A 64-endpoint decision walks ~100-300
 * blocks and ingestion keys every stored block, so these loops set the floor of both the
 * decision latency and the ingestion rate (issue 11). The Python versions in keys.py and
 * index.py stay the reference: they define the results, these functions must reproduce them
 * exactly (tests/unit/kv_events/test_native.py compares them on random inputs), and they are
 * what runs where this module was not built (pd_runtime/kv_events/native.py chooses).
 *
 * Every function returns None (or NotImplemented) where its fast path does not apply, rather
 * than raising, so that the caller falls back to the Python code and its error handling.
 *
 * Keys: CPython's numeric hash of an int and its tuple hash (Objects/longobject.c,
 * Objects/tupleobject.c, 64-bit builds: xxHash-style lanes), reproduced for tuples of ints so
 * that no tuple or int object is made per block. keys.py's docstring says why that hash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if SIZEOF_VOID_P != 8
#error "the block keys are defined for 64-bit CPython builds only"
#endif

#define MODULUS ((uint64_t)0x1FFFFFFFFFFFFFFFULL) /* 2**61 - 1, CPython's _PyHASH_MODULUS */
#define XXPRIME_1 ((uint64_t)11400714785074694791ULL)
#define XXPRIME_2 ((uint64_t)14029467366897019727ULL)
#define XXPRIME_5 ((uint64_t)2870177450012600261ULL)
#define XXROTATE(x) (((x) << 31) | ((x) >> 33))

/* x mod (2**61 - 1) without a division: 2**61 == 1 modulo it, so fold the top 3 bits in. */
static inline uint64_t mod_p(uint64_t x) {
    uint64_t r = (x & MODULUS) + (x >> 61);
    return r >= MODULUS ? r - MODULUS : r;
}

/* hash(int) for an int in [-2**63, 2**64): |v| mod (2**61 - 1) with v's sign, -1 -> -2. */
static inline int64_t hash_signed(int64_t v) {
    if (v >= 0) return (int64_t)mod_p((uint64_t)v);
    int64_t h = -(int64_t)mod_p(0 - (uint64_t)v);
    return h == -1 ? -2 : h;
}

static inline int64_t hash_unsigned(uint64_t v) { return (int64_t)mod_p(v); }

/* The tuple hash's running state, one lane per item. */
static inline uint64_t lane(uint64_t acc, int64_t item_hash) {
    acc += (uint64_t)item_hash * XXPRIME_2;
    acc = XXROTATE(acc);
    return acc * XXPRIME_1;
}

static inline int64_t finish(uint64_t acc, uint64_t len) {
    acc += len ^ (XXPRIME_5 ^ 3527539ULL);
    return acc == (uint64_t)-1 ? 1546275796 : (int64_t)acc;
}

/* hash((parent, content)): the chaining step of keys.chain_keys. */
static inline int64_t chain(int64_t parent, int64_t content) {
    uint64_t acc = XXPRIME_5;
    acc = lane(acc, hash_signed(parent));
    acc = lane(acc, hash_signed(content));
    return finish(acc, 2);
}

/* ---- msgpack arrays of ints (BlockStored.token_ids as it arrives: msgspec.Raw) ---------------- */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Reader;

static inline int need(Reader *r, Py_ssize_t n) { return r->end - r->p >= n; }

static inline uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* The array header: its length, or -1 if the bytes do not start with an array. */
static Py_ssize_t read_array_header(Reader *r) {
    if (!need(r, 1)) return -1;
    unsigned char b = *r->p++;
    if ((b & 0xF0) == 0x90) return b & 0x0F;
    if (b == 0xDC && need(r, 2)) {
        r->p += 2;
        return (Py_ssize_t)be(r->p - 2, 2);
    }
    if (b == 0xDD && need(r, 4)) {
        r->p += 4;
        return (Py_ssize_t)be(r->p - 4, 4);
    }
    return -1;
}

/* One int's hash into *h; 0 if the next value is not an int (or the bytes end). */
static inline int read_int_hash(Reader *r, int64_t *h) {
    if (!need(r, 1)) return 0;
    unsigned char b = *r->p++;
    if (b <= 0x7F) {
        *h = b;
        return 1;
    }
    if (b >= 0xE0) {
        *h = (int64_t)(int8_t)b;  /* -32..-1: hash(-1) is -2 */
        if (*h == -1) *h = -2;
        return 1;
    }
    int n;
    int is_signed;
    switch (b) {
        case 0xCC: n = 1; is_signed = 0; break;
        case 0xCD: n = 2; is_signed = 0; break;
        case 0xCE: n = 4; is_signed = 0; break;
        case 0xCF: n = 8; is_signed = 0; break;
        case 0xD0: n = 1; is_signed = 1; break;
        case 0xD1: n = 2; is_signed = 1; break;
        case 0xD2: n = 4; is_signed = 1; break;
        case 0xD3: n = 8; is_signed = 1; break;
        default: return 0;
    }
    if (!need(r, n)) return 0;
    uint64_t v = be(r->p, n);
    r->p += n;
    if (!is_signed) {
        *h = hash_unsigned(v);
    } else {
        int shift = 64 - 8 * n; /* sign-extend an n-byte two's complement value */
        int64_t s = (int64_t)(v << shift) >> shift;
        *h = hash_signed(s);
    }
    return 1;
}

/* Keys of consecutive full blocks whose content hashes come from next_hash: the loop shared
 * by the msgpack and the sequence variants. Returns a new list or NULL with an exception. */
#define CHAIN_BLOCKS(N_BLOCKS, BLOCK_SIZE, PARENT, NEXT_HASH_STMT)                          \
    do {                                                                                   \
        out = PyList_New(N_BLOCKS);                                                        \
        if (out == NULL) goto done;                                                        \
        int64_t key = (PARENT);                                                            \
        for (Py_ssize_t blk = 0; blk < (N_BLOCKS); blk++) {                                \
            uint64_t acc = XXPRIME_5;                                                      \
            for (Py_ssize_t t = 0; t < (BLOCK_SIZE); t++) {                                \
                int64_t item = 0;                                                          \
                NEXT_HASH_STMT;                                                            \
                acc = lane(acc, item);                                                     \
            }                                                                              \
            key = chain(key, finish(acc, (uint64_t)(BLOCK_SIZE)));                         \
            PyObject *k = PyLong_FromLongLong(key);                                        \
            if (k == NULL) {                                                               \
                Py_CLEAR(out);                                                             \
                goto done;                                                                 \
            }                                                                              \
            PyList_SET_ITEM(out, blk, k);                                                  \
        }                                                                                  \
    } while (0)

static int parse_parent_and_size(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                                 const char *name, int64_t *parent, Py_ssize_t *block_size) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected,
                     nargs);
        return -1;
    }
    *parent = PyLong_AsLongLong(args[0]);
    if (*parent == -1 && PyErr_Occurred()) return -1;
    *block_size = PyLong_AsSsize_t(args[2]);
    if (*block_size == -1 && PyErr_Occurred()) return -1;
    if (*block_size < 1) {
        PyErr_Format(PyExc_ValueError, "block_size must be >= 1, got %zd", *block_size);
        return -1;
    }
    return 0;
}

/* chain_keys_msgpack(parent, raw, block_size, n_blocks) -> list[int] | None:
 * keys.chain_keys(parent, decode(raw), block_size) without decoding. None if raw is not a
 * msgpack array of ints, or (n_blocks >= 0) not of exactly n_blocks * block_size of them: the
 * caller's Python path then names the error or handles the odd event. */
static PyObject *chain_keys_msgpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t parent;
    Py_ssize_t bs;
    if (parse_parent_and_size(args, nargs, 4, "chain_keys_msgpack", &parent, &bs) < 0) {
        return NULL;
    }
    Py_ssize_t n_blocks = PyLong_AsSsize_t(args[3]);
    if (n_blocks == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *out = NULL;
    Reader r = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    Py_ssize_t n = read_array_header(&r);
    if (n < 0 || n > r.end - r.p) goto none; /* an int takes at least a byte */
    if (n_blocks >= 0 && n != n_blocks * bs) goto none;
    /* One pass: key the full blocks, then check what follows them (a bad value anywhere is an
     * error, as it is for the Python decoder). */
    CHAIN_BLOCKS(n / bs, bs, parent, if (!read_int_hash(&r, &item)) goto bad);
    {
        int64_t h;
        for (Py_ssize_t i = (n / bs) * bs; i < n; i++) {
            if (!read_int_hash(&r, &h)) goto bad;
        }
    }
    if (r.p != r.end) goto bad;
done:
    PyBuffer_Release(&view);
    return out;
bad:
    Py_CLEAR(out);
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* chain_keys_ints(parent, token_ids, block_size) -> list[int] | None: keys.chain_keys without
 * extras for a list or tuple of ints; None for other sequences or an int beyond 64 bits. */
static PyObject *chain_keys_ints(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t parent;
    Py_ssize_t bs;
    if (parse_parent_and_size(args, nargs, 3, "chain_keys_ints", &parent, &bs) < 0) return NULL;
    PyObject *seq = args[1];
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) Py_RETURN_NONE;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    /* Hash every token first: a non-int or a huge int sends the whole call back to Python. */
    int64_t *hashes = PyMem_Malloc(sizeof(int64_t) * (n ? n : 1));
    if (hashes == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i];
        if (!PyLong_CheckExact(o)) goto none;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) goto none;
        hashes[i] = hash_signed(v);
    }
    PyObject *out = NULL;
    {
        const int64_t *next = hashes;
        CHAIN_BLOCKS(n / bs, bs, parent, item = *next++);
    }
done:
    PyMem_Free(hashes);
    return out;
none:
    PyMem_Free(hashes);
    Py_RETURN_NONE;
}

/* ---- the walk (index.leading_blocks without an overlay) --------------------------------------- */

/* Masks are endpoint bitmasks (one bit per endpoint, bits reused, so below the endpoint count):
 * held here as up to MAX_WORDS 64-bit words, 1,024 endpoints; beyond, the Python version. */
#define MAX_WORDS 16

#if !PY_LITTLE_ENDIAN
#error "masks are read as little-endian words"
#endif

/* A non-negative int of at most `words` words into w (zero-extended); -1 if it does not fit,
 * is negative or is not an int (no exception left set). */
static int to_words(PyObject *o, uint64_t *w, int words) {
    if (!PyLong_Check(o)) return -1;
    if (words == 1) {
        unsigned long long v = PyLong_AsUnsignedLongLong(o);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        w[0] = v;
        return 0;
    }
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t got = PyLong_AsNativeBytes(
        o, w, (Py_ssize_t)words * 8,
        Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER |
            Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (got < 0 || got > (Py_ssize_t)words * 8) {
        PyErr_Clear();
        return -1;
    }
#else
    if (_PyLong_AsByteArray((PyLongObject *)o, (unsigned char *)w, (size_t)words * 8, 1, 0) < 0) {
        PyErr_Clear();
        return -1;
    }
#endif
    return 0;
}

/* The bit length of a non-negative int; (size_t)-1 for a negative one or an error (cleared). */
static size_t bit_length(PyObject *o) {
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t bytes = PyLong_AsNativeBytes(
        o, NULL, 0, Py_ASNATIVEBYTES_UNSIGNED_BUFFER | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (bytes < 0) {
        PyErr_Clear();
        return (size_t)-1;
    }
    return (size_t)bytes * 8; /* whole bytes: a width at least as large, which is all we need */
#else
    if (_PyLong_Sign(o) < 0) return (size_t)-1;
    size_t bits = _PyLong_NumBits(o);
    if (bits == (size_t)-1) PyErr_Clear();
    return bits;
#endif
}

typedef struct {
    Py_ssize_t at;
    int bit;
    int delta; /* +1 a span starts here, -1 one ends */
} SpanEdge;

static int edge_order(const void *a, const void *b) {
    Py_ssize_t x = ((const SpanEdge *)a)->at, y = ((const SpanEdge *)b)->at;
    return (x > y) - (x < y);
}

/* The bit index of a power of two of at most `words` words; -1 otherwise. */
static int bit_index(PyObject *o, int words) {
    uint64_t w[MAX_WORDS];
    if (to_words(o, w, words) < 0) return -1;
    int found = -1;
    for (int i = 0; i < words; i++) {
        if (!w[i]) continue;
        if (found >= 0 || (w[i] & (w[i] - 1))) return -1;
        found = 64 * i + __builtin_ctzll(w[i]);
    }
    return found;
}

typedef struct {
    int words;
    PyObject *endpoint[64 * MAX_WORDS]; /* borrowed from endpoint_of_bit */
    int live[64 * MAX_WORDS];           /* spans of each bit covering the current position */
} Walk;

/* The endpoint table from endpoint_of_bit ({1 << i: endpoint}): 0, or -1 where a key is not a
 * power of two or there are too many endpoints (the Python version then runs). */
static int walk_init(Walk *walk, PyObject *endpoint_of_bit) {
    /* The highest bit sets the mask width (bits are reused, so it is below the peak endpoint
     * count: usually one word, two from 65 endpoints). */
    size_t top = 1;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(endpoint_of_bit, &pos, &key, &value)) {
        if (!PyLong_CheckExact(key)) return -1;
        size_t bits = bit_length(key);
        if (bits == (size_t)-1 || bits > 64 * MAX_WORDS) return -1;
        if (bits > top) top = bits;
    }
    walk->words = (int)((top + 63) / 64);
    memset(walk->endpoint, 0, sizeof(PyObject *) * 64 * walk->words);
    memset(walk->live, 0, sizeof(int) * 64 * walk->words);
    pos = 0;
    while (PyDict_Next(endpoint_of_bit, &pos, &key, &value)) {
        int bit = bit_index(key, walk->words);
        if (bit < 0 || !PyUnicode_CheckExact(value)) return -1; /* str: hashing runs no Python */
        walk->endpoint[bit] = value;
    }
    return 0;
}

/* Record each endpoint of `bits` (ascending bit order, as the Python version) at `count`;
 * a bit with no endpoint raises KeyError, as endpoint_of_bit[low] does in Python. */
static int record(PyObject *result, const Walk *walk, const uint64_t *bits, Py_ssize_t count) {
    PyObject *n = NULL;
    for (int w = 0; w < walk->words; w++) {
        uint64_t word = bits[w];
        while (word) {
            int bit = 64 * w + __builtin_ctzll(word);
            word &= word - 1;
            PyObject *endpoint = walk->endpoint[bit];
            if (endpoint == NULL) {
                PyObject *one = PyLong_FromLong(1), *shift = PyLong_FromLong(bit);
                PyObject *missing = one && shift ? PyNumber_Lshift(one, shift) : NULL;
                if (missing) PyErr_SetObject(PyExc_KeyError, missing);
                Py_XDECREF(one);
                Py_XDECREF(shift);
                Py_XDECREF(missing);
                goto fail;
            }
            if (n == NULL && (n = PyLong_FromSsize_t(count)) == NULL) goto fail;
            if (PyDict_SetItem(result, endpoint, n) < 0) goto fail;
        }
    }
    Py_XDECREF(n);
    return 0;
fail:
    Py_XDECREF(n);
    return -1;
}

/* The ends of the claims found so far in a walk with `claims`: (position, bit), unordered, with
 * the nearest position kept aside so that most blocks check one number. */
typedef struct {
    SpanEdge *items;
    Py_ssize_t len, cap;
    Py_ssize_t next; /* the smallest `at` among items (PY_SSIZE_T_MAX when empty) */
} ClaimEnds;

static void live_add(Walk *walk, uint64_t *pend, int bit, int delta) {
    walk->live[bit] += delta;
    if (walk->live[bit] > 0) {
        pend[bit / 64] |= 1ULL << (bit % 64);
    } else {
        pend[bit / 64] &= ~(1ULL << (bit % 64));
    }
}

/* Apply (and drop) the claim ends at or before position i. */
static void ends_apply(ClaimEnds *ends, Walk *walk, uint64_t *pend, Py_ssize_t i) {
    Py_ssize_t kept = 0, next = PY_SSIZE_T_MAX;
    for (Py_ssize_t k = 0; k < ends->len; k++) {
        SpanEdge edge = ends->items[k];
        if (edge.at <= i) {
            live_add(walk, pend, edge.bit, -1);
        } else {
            ends->items[kept++] = edge;
            if (edge.at < next) next = edge.at;
        }
    }
    ends->len = kept;
    ends->next = next;
}

static PyObject *str_keys, *str_bit; /* interned attribute names of a claim */

/* keys[i] == ck[j] for two exact ints (comparing them runs no Python code): 1 or 0; -1 when
 * either is something else. */
static inline int same_int(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b)) return -1;
    return PyObject_RichCompareBool(a, b, Py_EQ); /* ints: never fails */
}

/* One claim found at position i (its head is keys[i]): it covers keys[i:] up to where its keys
 * and the prompt's part (index.claim_spans, the Python reference, says why one comparison
 * mostly does). Its bit is switched on and its end queued. 0, 1 for "not for C" (the caller
 * returns NotImplemented), -1 with an exception. */
static int claim_start(PyObject *claim, PyObject **items, Py_ssize_t n, Py_ssize_t i, Walk *walk,
                       uint64_t *pend, ClaimEnds *ends) {
    PyObject *bit_obj = PyObject_GetAttr(claim, str_bit);
    if (bit_obj == NULL) return (PyErr_Clear(), 1);
    int bit = bit_index(bit_obj, walk->words);
    Py_DECREF(bit_obj);
    PyObject *ck = PyObject_GetAttr(claim, str_keys); /* no Python code runs after this */
    if (ck == NULL) return (PyErr_Clear(), 1);
    if (bit < 0 || !(PyList_CheckExact(ck) || PyTuple_CheckExact(ck)) ||
        PySequence_Fast_GET_SIZE(ck) == 0) {
        Py_DECREF(ck);
        return 1;
    }
    PyObject **claim_keys = PySequence_Fast_ITEMS(ck);
    Py_ssize_t m = PySequence_Fast_GET_SIZE(ck);
    if (m > n - i) m = n - i;
    Py_ssize_t length = m;
    int same = same_int(claim_keys[m - 1], items[i + m - 1]);
    if (same == 0) { /* bisect for the first position that differs */
        Py_ssize_t lo = 1, hi = m - 1; /* ck[0] is the head, ck[m - 1] differs */
        while (lo <= hi && same >= 0) {
            Py_ssize_t mid = (lo + hi) / 2;
            same = same_int(claim_keys[mid], items[i + mid]);
            if (same > 0) {
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
        length = lo;
    }
    Py_DECREF(ck);
    if (same < 0) return 1;
    if (ends->len == ends->cap) {
        Py_ssize_t cap = ends->cap ? 2 * ends->cap : 16;
        SpanEdge *grown = PyMem_Realloc(ends->items, sizeof(SpanEdge) * cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        ends->items = grown;
        ends->cap = cap;
    }
    live_add(walk, pend, bit, +1);
    ends->items[ends->len++] = (SpanEdge){i + length, bit, -1};
    if (i + length < ends->next) ends->next = i + length;
    return 0;
}

/* The claims whose first key is keys[i] (claims: {first key: [claim, ...]}, a claim having
 * `keys`, a run of chained keys, and `bit`); claim_start for each. */
static int claims_start(PyObject *claims, PyObject **items, Py_ssize_t n, Py_ssize_t i,
                        Walk *walk, uint64_t *pend, ClaimEnds *ends) {
    PyObject *found = PyDict_GetItemWithError(claims, items[i]);
    if (found == NULL) return PyErr_Occurred() ? (PyErr_Clear(), 1) : 0;
    if (!PyList_CheckExact(found)) return 1;
    /* A copy: reading a claim's attributes could run Python code (a property), which must not
     * change the list under us. The prompt's keys are a tuple for the same reason. */
    PyObject *found_claims = PyList_AsTuple(found);
    if (found_claims == NULL) return -1;
    int status = 0;
    for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(found_claims) && status == 0; c++) {
        status = claim_start(PyTuple_GET_ITEM(found_claims, c), items, n, i, walk, pend, ends);
    }
    Py_DECREF(found_claims);
    return status;
}

/* leading_blocks(keys, masks, endpoint_of_bit, spans, claims) -> dict | NotImplemented.
 * `spans` ((start, end, bit) position ranges) and `claims` (claims by first key, turned into
 * such ranges during the walk, so that only the blocks walked are looked up) lay the
 * scheduler's pending claims over the masks; either may be None.
 * NotImplemented where the fast path does not apply (keys not a list or tuple, masks not a
 * dict, more than 1,024 endpoints, a mask or bit that is not what the index makes): the
 * caller runs the Python version. */
static PyObject *leading_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "leading_blocks() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *keys = args[0], *masks = args[1], *endpoint_of_bit = args[2], *spans = args[3];
    PyObject *claims = args[4];
    if (!(PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) || !PyDict_Check(masks) ||
        !PyDict_Check(endpoint_of_bit) || (claims != Py_None && !PyDict_Check(claims))) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    Walk *walk = PyMem_Malloc(sizeof(Walk));
    if (walk == NULL) return PyErr_NoMemory();
    SpanEdge *edges = NULL;
    ClaimEnds ends = {NULL, 0, 0, PY_SSIZE_T_MAX};
    PyObject *result = NULL, *held_keys = NULL;
    if (walk_init(walk, endpoint_of_bit) < 0) goto not_implemented;
    const int words = walk->words;
    Py_ssize_t n_edges = 0;
    if (spans != Py_None) {
        if (!PyList_CheckExact(spans) && !PyTuple_CheckExact(spans)) goto not_implemented;
        Py_ssize_t n_spans = PySequence_Fast_GET_SIZE(spans);
        if (n_spans) {
            edges = PyMem_Malloc(sizeof(SpanEdge) * 2 * n_spans);
            if (edges == NULL) {
                PyErr_NoMemory();
                goto error;
            }
        }
        PyObject **span_items = PySequence_Fast_ITEMS(spans);
        for (Py_ssize_t s = 0; s < n_spans; s++) {
            PyObject *span = span_items[s];
            if (!PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) != 3) goto not_implemented;
            Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 0));
            Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
            if ((start == -1 || end == -1) && PyErr_Occurred()) {
                PyErr_Clear();
                goto not_implemented;
            }
            int bit = bit_index(PyTuple_GET_ITEM(span, 2), words);
            if (bit < 0) goto not_implemented;
            if (end > start) {
                edges[n_edges++] = (SpanEdge){start, bit, +1};
                edges[n_edges++] = (SpanEdge){end, bit, -1};
            }
        }
        if (n_edges > 1) qsort(edges, n_edges, sizeof(SpanEdge), edge_order);
    }

    result = PyDict_New();
    if (result == NULL) goto error;
    if (claims != Py_None) { /* a tuple: claim attributes could run Python code (see there) */
        keys = PySequence_Tuple(keys);
        if (keys == NULL) goto error;
    } else {
        Py_INCREF(keys);
    }
    held_keys = keys;
    PyObject **items = PySequence_Fast_ITEMS(keys);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    uint64_t pend[MAX_WORDS] = {0}, alive[MAX_WORDS] = {0}, here[MAX_WORDS], gone[MAX_WORDS];
    Py_ssize_t e = 0, i = 0;
    for (i = 0; i < n; i++) {
        while (e < n_edges && edges[e].at <= i) { /* a span starting before 0: counted at 0 */
            live_add(walk, pend, edges[e].bit, edges[e].delta);
            e++;
        }
        if (!PyLong_CheckExact(items[i])) goto not_implemented; /* hashing runs no Python */
        if (i >= ends.next) ends_apply(&ends, walk, pend, i);
        if (claims != Py_None) {
            int got = claims_start(claims, items, n, i, walk, pend, &ends);
            if (got < 0) goto error;
            if (got > 0) goto not_implemented;
        }
        PyObject *mask = PyDict_GetItemWithError(masks, items[i]);
        if (mask != NULL) {
            if (to_words(mask, here, words) < 0) goto not_implemented;
        } else if (PyErr_Occurred()) { /* an unhashable key: let Python raise it */
            PyErr_Clear();
            goto not_implemented;
        } else {
            memset(here, 0, sizeof(uint64_t) * words);
        }
        uint64_t any_alive = 0, any_gone = 0;
        for (int w = 0; w < words; w++) {
            here[w] |= pend[w];
            if (i == 0) {
                alive[w] = here[w];
                gone[w] = 0;
            } else {
                gone[w] = alive[w] & ~here[w];
                alive[w] &= here[w];
            }
            any_alive |= alive[w];
            any_gone |= gone[w];
        }
        if (any_gone && record(result, walk, gone, i) < 0) goto error;
        if (!any_alive) break;
    }
    if (record(result, walk, alive, i) < 0) goto error;
    PyMem_Free(edges);
    PyMem_Free(ends.items);
    PyMem_Free(walk);
    Py_XDECREF(held_keys);
    return result;
not_implemented:
    Py_XDECREF(result);
    PyMem_Free(edges);
    PyMem_Free(ends.items);
    PyMem_Free(walk);
    Py_XDECREF(held_keys);
    Py_RETURN_NOTIMPLEMENTED;
error:
    Py_XDECREF(result);
    PyMem_Free(edges);
    PyMem_Free(ends.items);
    PyMem_Free(walk);
    Py_XDECREF(held_keys);
    return NULL;
}

/* ---- storing (index.PrefixIndex._insert's usual case) -------------------------------------- */

/* insert_new(tier, held, hashes, keys, ep_bit, start) -> int: records blocks start, start+1,
 * ... as the index's insertion loop does for a new engine hash (tier[h] = key, and the
 * endpoint's bit ORed into held[key]), stopping at the first block that is not that usual case
 * (an engine hash already in the tier, or a key the endpoint already holds under another hash):
 * returns its position (len(hashes) when all were stored), for the caller to handle that block
 * in Python and call again from the next. Only for the single-tier index, where held is also
 * the any-tier dict. */
static PyObject *insert_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "insert_new() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *tier = args[0], *held = args[1], *hashes = args[2], *keys = args[3];
    PyObject *ep_bit = args[4];
    Py_ssize_t start = PyLong_AsSsize_t(args[5]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    if (!PyDict_Check(tier) || !PyDict_Check(held) || !PyLong_CheckExact(ep_bit) ||
        !(PyList_CheckExact(hashes) || PyTuple_CheckExact(hashes)) ||
        !(PyList_CheckExact(keys) || PyTuple_CheckExact(keys))) {
        PyErr_SetString(PyExc_TypeError, "insert_new: dicts, a list of hashes and keys, an int");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(hashes);
    if (PySequence_Fast_GET_SIZE(keys) != n) {
        PyErr_SetString(PyExc_ValueError, "insert_new: one key per hash");
        return NULL;
    }
    PyObject **hash_items = PySequence_Fast_ITEMS(hashes), **key_items = PySequence_Fast_ITEMS(keys);
    Py_ssize_t i;
    for (i = start < 0 ? 0 : start; i < n; i++) {
        PyObject *h = hash_items[i], *key = key_items[i];
        /* Types whose hashing and comparing run no Python code (else _add does the block). */
        if (!(PyBytes_CheckExact(h) || PyLong_CheckExact(h)) || !PyLong_CheckExact(key)) break;
        int known = PyDict_Contains(tier, h);
        if (known < 0) return NULL;
        if (known) break; /* a re-store or a new key for the hash */
        PyObject *bits = PyDict_GetItemWithError(held, key);
        PyObject *mask;
        if (bits != NULL) {
            PyObject *both = PyNumber_And(bits, ep_bit);
            if (both == NULL) return NULL;
            int dupe = PyObject_IsTrue(both);
            Py_DECREF(both);
            if (dupe < 0) return NULL;
            if (dupe) break; /* the endpoint holds the key under another hash */
            mask = PyNumber_Or(bits, ep_bit);
            if (mask == NULL) return NULL;
        } else if (PyErr_Occurred()) {
            return NULL;
        } else {
            mask = Py_NewRef(ep_bit);
        }
        if (PyDict_SetItem(tier, h, key) < 0 || PyDict_SetItem(held, key, mask) < 0) {
            Py_DECREF(mask);
            return NULL;
        }
        Py_DECREF(mask);
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"leading_blocks", (PyCFunction)(void (*)(void))leading_blocks, METH_FASTCALL,
     "index.leading_blocks without an overlay, spans and claims laid over the masks, up to 1,024 "
     "endpoints; NotImplemented otherwise."},
    {"chain_keys_msgpack", (PyCFunction)(void (*)(void))chain_keys_msgpack, METH_FASTCALL,
     "keys.chain_keys(parent, msgpack-decoded raw, block_size) without extras; None if raw is "
     "not a msgpack array of ints (of n_blocks * block_size ints, if n_blocks >= 0)."},
    {"chain_keys_ints", (PyCFunction)(void (*)(void))chain_keys_ints, METH_FASTCALL,
     "keys.chain_keys(parent, token_ids, block_size) without extras for a list or tuple of "
     "64-bit ints; None otherwise."},
    {"insert_new", (PyCFunction)(void (*)(void))insert_new, METH_FASTCALL,
     "PrefixIndex._insert's usual case (new engine hashes, one tier); returns where it stopped."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "pd_runtime.kv_events._native",
    .m_doc = "Compiled fast paths of the prefix index (see native.py).",
    .m_size = -1,
    .m_methods = methods,
};

/* Raised whenever a function's arguments or results change: native.py refuses a module built
 * from another version of this file (an editable install not rebuilt after a pull) rather than
 * calling it with the wrong arguments. */
#define INTERFACE_VERSION 1

PyMODINIT_FUNC PyInit__native(void) {
    str_keys = PyUnicode_InternFromString("keys");
    str_bit = PyUnicode_InternFromString("bit");
    if (str_keys == NULL || str_bit == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "INTERFACE_VERSION", INTERFACE_VERSION) < 0) {
        Py_CLEAR(m);
    }
    return m;
}
