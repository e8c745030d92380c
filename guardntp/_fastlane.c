/*
 * guardntp._fastlane: the server's packet loop for one UDP socket, compiled.
 *
 * Why C: the server must answer at chronyd's rate on one core. The kernel's share
 * per answer is the same for both servers (~2.3 us); chronyd's user space costs
 * ~0.4 us and the interpreter alone cannot get near it (docs/benchmarks.md).
 *
 * What it does (guardntp/fastlane.py is the Python face; read it first):
 *   recvmmsg a batch -> prefetch its records -> for each datagram decide ->
 *   sendmmsg the replies in chunks of 16, each chunk's time replies stamped
 *   just before the call.
 *
 * Pipeline.decide is the reference model: this file decides every packet as it
 * would, reading and writing the very same Python objects Pipeline.decide uses
 * (the tables' AddressTables of per-source and prefix Records, the newcomer
 * ring, the counters, the global and KoD buckets), with the same arithmetic
 * (both read the monotonic clock within EARLIEST_NS..LATEST_NS, where every
 * time it keeps fits in int64: times_fit):
 *   - a request whose first byte the sanity table drops (modes 0, 2, 4-7, bad
 *     versions) -> that drop, counted; a datagram of another length whose
 *     length (short, not a multiple of 4), first byte or tail (extension
 *     fields and MAC by wire.parse_tail's rules; a crypto-NAK) the sanity
 *     stage refuses -> the same (decide_longer);
 *   - a longer request is then decided as a 48-byte one. Its MAC (if the tail
 *     holds one) fails as AUTH_FAILED where no key is configured; where keys
 *     are, Pipeline.verify_mac checks it. Where NTS is on, the NTS stage's
 *     claims() says whether the request is NTS (its label), and for one
 *     without a MAC its decide() opens the cookie: dropped, NTS NAK, or
 *     answered. Those calls are the auth stage's cryptography, the only calls
 *     into Python for a packet decided here. A reply to a request that
 *     authenticated is queued with its signer (the MAC, or NTS's finish()),
 *     stamped and then completed when its chunk is sent;
 *   - a source port on the reflection list -> drop, counted;
 *   - the access list (IPv4: the record's cached entry while the list and the
 *     entry stand, else the list's lookup; IPv6: the lookup every time, as
 *     Python does). The lookup, longest_match_in, walks the prefix lengths of
 *     both layers longest first: the configuration's AddressTables
 *     (AccessList.probes) and the blocklist's BlockTable (AccessList.block_table),
 *     whose entry wins a tie; a lapsed entry uncovers shorter prefixes.
 *     DROP -> drop; DENY -> a DENY KoD within the KoD guard and
 *     budget, else drop; EXEMPT -> a time reply (or the global cap's drop);
 *   - no entry or ALLOW: both buckets conforming -> a time reply (or the
 *     global cap's drop); over either -> the random leak's time reply, a RATE
 *     KoD, or a drop.
 * Sources the table does not hold are decided here too (first_sighting): a
 * first request while the table has room creates the Record and inserts it
 * (BucketTable.insert); once the table is full it is
 * remembered in the NewcomerRing; a returning newcomer is promoted with
 * BucketTable.admit's eviction scan (or stays a newcomer: table_full). A new
 * prefix is created and admitted the same way, else it shares the overflow
 * record.
 * NTPv1 requests (the Netgear and other SNTPv1 floods) are included: their
 * sanity verdict and label depend on the source port too (label_slot).
 * A source that must authenticate (authenticator.required_for) and sent no
 * MAC is dropped here as AUTH_REQUIRED.
 * There is no per-packet handoff. A record the filter did not write is an
 * error (the batch is lost and counted). Where the tables or the ring are
 * Python's (the reference model's), or objects.enabled is false, the loop is
 * only the socket layer: Pipeline.decide decides every packet (slow_decide).
 * What it knows of the filter it copies at configure() from one typed policy
 * object (guardntp/filter/lane.py, built by Pipeline.lane_policy()): the record
 * layout and the reason codes it shares with reference.py, the compiled policy's
 * tables per first byte and its limits, and the pipeline's live objects.
 * tests/test_fastlane.py runs random traffic (and floods of new sources)
 * through both, the reference with its tables in OrderedDicts and its ring in
 * Python, and compares every reply, counter, record, the tables' order and the
 * ring.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD 48
#define BEFORE_TRANSMIT 40
#define STAMP_EVERY 16
#define FIELDS_LEN 21
#define HEADS_LEN 128
/* A receive timestamp and a TTL / hop limit (an int; both for a mapped IPv4 source). */
#define CONTROL_SPACE (CMSG_SPACE(sizeof(struct timespec)) + 2 * CMSG_SPACE(sizeof(int)))
#define NS_PER_S 1000000000LL
#define NTP_UNIX_OFFSET_S 2208988800LL
#define NTP_PORT 123
#define V1_NETGEAR 256        /* label slots of NTPv1 requests: from the Netgear port */
#define V1_OTHER 257          /* ... and from any other */
#define NTS_SLOT 258          /* ... and of a request the NTS stage claims */
#define LABEL_SLOTS 259

enum { Q_TIME, Q_PLAIN, Q_DEFERRED, Q_SKIP };

typedef struct {
    int kind;
    int is_time;
    Py_ssize_t size;
    PyObject *reply;   /* Q_DEFERRED only: owned */
    PyObject *signer;  /* Q_DEFERRED only: owned, or NULL */
} Queued;

typedef struct {
    PyObject_HEAD
    int fd, v6, batch, slot, name_len, name_stride, used;
    unsigned char *heads, *tails, *names, *control, *out;
    unsigned char xmt[8];
    struct mmsghdr *rh, *sh;
    struct iovec *riov, *siov;
    Queued *queue;

    /* configuration (configure) */
    int configured, enabled;
    PyObject *pipeline, *decide, *counts, *label_counts;
    PyObject *index, *prefix_index;   /* the tables' records: AddressTables (SOURCE_TABLE) */
    PyObject *acl, *responder, *random;
    PyObject *required_for;            /* authenticator.required_for, or None: nobody must */
    PyObject *action_allow, *action_exempt, *action_drop, *action_deny;   /* Action members */
    /* Per label slot: the first byte, or for NTPv1 (whose label depends on the
     * source port) V1_NETGEAR / V1_OTHER; see label_slot(). */
    PyObject *labels[LABEL_SLOTS];
    int64_t interval[LABEL_SLOTS], tolerance[LABEL_SLOTS];
    unsigned char kod_of_first[LABEL_SLOTS];
    int netgear_port;
    signed char drop_reason[256], drop_reason_ntp_port[256];  /* the latter: port 123 */
    unsigned char eligible[256], reply_mode[256];   /* eligible: not dropped by first byte */
    int64_t prefix_interval, prefix_tolerance;
    int has_global;
    int64_t global_interval, global_tolerance;
    int v4_prefix_bits, n_reasons, n_counts, reason_reflection, reason_global_cap;
    int v6_source_bytes, v6_prefix_bits;
    int reason_leaked, reason_rate_kod, reason_rate_limited, last_time_reason;
    int reason_acl_deny, reason_blocklisted, reason_deny_kod, reason_malformed;
    int reason_auth_required, reason_auth_failed, reason_crypto_nak;
    int reason_nts_nak, reason_nts_rejected;
    /* The authenticator verifies MACs (else a MAC fails); an NTS stage may claim
     * a longer datagram: either sends such datagrams to Python (decide_longer). */
    int verifies_macs, nts;
    PyObject *verify_mac;              /* Pipeline.verify_mac(data, port): MACs stay in Python */
    PyObject *nts_claims, *nts_decide; /* the NTS stage's (None: no NTS) */
    /* wire.py's tail lengths: (extension field, MAC, bare MAC, longest MAC, crypto-NAK) */
    int min_ext_field, min_mac, max_bare_mac, max_mac, crypto_nak_len;
    double leak_share;   /* ReferenceModel._over_limit: leak, else RATE KoD, else drop */
    int send_kod;
    int64_t kod_interval, kod_bucket_interval, kod_bucket_tolerance, kod_min_poll;
    Py_ssize_t record_len;
    int i_tat, i_requests, i_time_replies, i_drops, i_last_seen, i_label;
    int i_acl_generation, i_acl_entry, i_port, i_kods, i_last_kod, i_first_seen;
    /* Traffic classes and the crowd estimate (guardntp/filter/crowd.py, ReferenceModel._observe) */
    int i_home_ttl, i_other_tat, i_port_sketch, i_window_start, i_crowd, i_gap_mean,
        i_gap_dev, i_other_ttl, i_last_crowd;
    int64_t initial_ttls[3];
    int ttl_classes, max_crowd, sketch_bits, ewma_shift;
    int64_t ttl_slack, class_memory_ns, crowd_window_ns, irregular_num, irregular_den;
    int64_t crowd_of_bits[64];
    unsigned char reflection[8192];
    /* First sightings (first_sighting): the tables and the newcomer ring. ring
     * NULL: the pipeline's ring is not a NewcomerRing, first sightings go to Python. */
    PyObject *sources, *prefixes, *ring, *prefix_overflow;
    /* The global reply and KoD budgets: the pipeline's two-cell Record, read and
     * written in place (BUDGET_GLOBAL, BUDGET_KOD). */
    PyObject *budgets;
    int64_t never, eviction_scan, earliest_ns, latest_ns;

    /* per pump */
    int64_t acl_generation, offset_ns;
    int acl_covers_v6;                 /* the access list has an IPv6 entry (either layer) */
    /* AccessList.probes(4) and (16), as of probes_generation: its tables to look
     * an address up in, longest prefix first (owned); and its block_table, the
     * blocklist layer (a BlockTable, owned, or NULL: none). */
    PyObject *probes4, *probes6, *block;
    int64_t probes_generation;
    int acl_empty;                     /* ... no entry at all (of acl_empty_generation) */
    int64_t acl_empty_generation;
    int64_t max_sources, max_prefixes; /* the tables' max_entries */
    unsigned char reply_heads[HEADS_LEN], fields[FIELDS_LEN];
    /* The counts by label (objects.label_counts: a LabelCounts): its Counts, and
     * per label slot the cell of that slot's label. */
    PyObject *label_cells;
    int label_index[LABEL_SLOTS];
    int64_t fast_decisions, first_sightings, promotions;
    /* The datagram being decided, for verify_mac (which needs its bytes), and the
     * signer its MAC verified with: owned, taken by the reply (else released). */
    const unsigned char *datagram_head, *datagram_tail;
    Py_ssize_t datagram_len;
    int datagram_port;
    PyObject *datagram;                /* its bytes, once a call needed them (owned) */
    PyObject *signer;
} Lane;

/* ------------------------------------------------------------------ helpers */

static int
as_i64(PyObject *obj, int64_t *value)
{
    int overflow = 0;
    long long v;
    if (!PyLong_CheckExact(obj))
        return 0;
    v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *value = v;
    return 1;
}

static int64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Responder.time_reply_at's receive field: floor(((ns + offset) << 32) / 1e9) + epoch. */
static void
put_ntp(unsigned char *out, __int128 unix_ns)
{
    __int128 t = unix_ns * ((__int128)1 << 32);
    __int128 q = t / NS_PER_S;
    uint64_t ntp;
    int i;
    if (t % NS_PER_S != 0 && t < 0)
        q -= 1;
    ntp = (uint64_t)(q + ((__int128)NTP_UNIX_OFFSET_S << 32));
    for (i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(ntp & 0xFF);
        ntp >>= 8;
    }
}

static PyObject *
get_attr_i64(PyObject *obj, const char *name, int64_t *value)
{
    PyObject *attr = PyObject_GetAttrString(obj, name);
    if (attr == NULL)
        return NULL;
    if (!as_i64(attr, value)) {
        Py_DECREF(attr);
        PyErr_Format(PyExc_TypeError, "%s must be an int that fits 64 bits", name);
        return NULL;
    }
    return attr;
}

/* ------------------------------------------------------------------ pump state */

static int budgets_in_cells(PyObject *budgets);
static PyTypeObject BlockTableType;
static int block_covers_v6(PyObject *table);

/* Read what may change between pumps: the access list's generation, the global
 * bucket, the responder's clock snapshot (reply_heads, fields, offset_ns). */
static int
begin(Lane *L)
{
    PyObject *obj, *snapshot;
    if (!L->configured) {
        PyErr_SetString(PyExc_RuntimeError, "fast lane used before configure()");
        return -1;
    }
    if ((obj = get_attr_i64(L->acl, "generation", &L->acl_generation)) == NULL)
        return -1;
    Py_DECREF(obj);
    if (L->acl_empty < 0 || L->acl_empty_generation != L->acl_generation) {
        Py_ssize_t entries = PyObject_Size(L->acl);
        if (entries < 0)
            return -1;
        L->acl_empty = entries == 0;
        L->acl_empty_generation = L->acl_generation;
    }
    if ((obj = get_attr_i64(L->sources, "max_entries", &L->max_sources)) == NULL)
        return -1;
    Py_DECREF(obj);
    if ((obj = get_attr_i64(L->prefixes, "max_entries", &L->max_prefixes)) == NULL)
        return -1;
    Py_DECREF(obj);
    if (L->probes4 == NULL || L->probes_generation != L->acl_generation) {
        PyObject *v4 = PyObject_CallMethod(L->acl, "probes", "i", 4), *v6 = NULL, *block;
        if (v4 != NULL)
            v6 = PyObject_CallMethod(L->acl, "probes", "i", 16);
        if (v6 == NULL || !PyTuple_Check(v4) || !PyTuple_Check(v6)) {
            if (v6 != NULL)
                PyErr_SetString(PyExc_TypeError, "AccessList.probes() must give a tuple");
            Py_XDECREF(v4);
            Py_XDECREF(v6);
            return -1;
        }
        /* The blocklist layer: an access list without the attribute has none. */
        if ((block = PyObject_GetAttrString(L->acl, "block_table")) == NULL
                && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            block = Py_NewRef(Py_None);
        }
        if (block != NULL && block != Py_None && Py_TYPE(block) != &BlockTableType) {
            PyErr_Format(PyExc_TypeError, "AccessList.block_table must be a BlockTable or "
                         "None, not %.100s", Py_TYPE(block)->tp_name);
            Py_CLEAR(block);
        }
        if (block == NULL) {
            Py_DECREF(v4);
            Py_DECREF(v6);
            return -1;
        }
        if (block == Py_None)
            Py_CLEAR(block);
        Py_XSETREF(L->probes4, v4);
        Py_XSETREF(L->probes6, v6);
        Py_XSETREF(L->block, block);
        L->probes_generation = L->acl_generation;
        L->acl_covers_v6 = PyTuple_GET_SIZE(v6) > 0 || (block != NULL && block_covers_v6(block));
    }
    if (!budgets_in_cells(L->budgets)) {
        /* (only Python's unbounded arithmetic makes a TAT past 64 bits) */
        PyErr_SetString(PyExc_TypeError, "the pipeline's budgets must be ints that fit 64 bits");
        return -1;
    }
    snapshot = PyObject_GetAttrString(L->responder, "wire_snapshot");
    if (snapshot == NULL)
        return -1;
    if (!PyTuple_Check(snapshot) || PyTuple_GET_SIZE(snapshot) != 3
            || !PyBytes_Check(PyTuple_GET_ITEM(snapshot, 0))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(snapshot, 0)) != HEADS_LEN
            || !PyBytes_Check(PyTuple_GET_ITEM(snapshot, 1))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(snapshot, 1)) != FIELDS_LEN
            || !as_i64(PyTuple_GET_ITEM(snapshot, 2), &L->offset_ns)) {
        Py_DECREF(snapshot);
        PyErr_SetString(PyExc_TypeError, "responder.wire_snapshot: (128 bytes, 21 bytes, int)");
        return -1;
    }
    memcpy(L->reply_heads, PyBytes_AS_STRING(PyTuple_GET_ITEM(snapshot, 0)), HEADS_LEN);
    memcpy(L->fields, PyBytes_AS_STRING(PyTuple_GET_ITEM(snapshot, 1)), FIELDS_LEN);
    Py_DECREF(snapshot);
    return 0;
}


/* ------------------------------------------------------------------ Counts */

/*
 * The packet counts by (NTP version, reason) (verdicts.Counters.counts): a
 * fixed-length sequence of 64-bit counts, which the compiled core adds to in
 * place and Python reads and writes like the list it was (counts[i], counts[i]
 * += n, len, iteration, list(counts)). One copy: nothing is gathered on the
 * side and flushed at the end of a pump, so what a scrape or a test reads is
 * what has been counted.
 */
typedef struct {
    PyObject_VAR_HEAD
    int64_t count[1];
} Counts;

static PyTypeObject CountsType;

#define COUNT(L, i) (((Counts *)(L)->counts)->count[i])
#define LABEL_COUNT(L, slot) (((Counts *)(L)->label_cells)->count[(L)->label_index[slot]])

static PyObject *
Counts_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Py_ssize_t size;
    Counts *c;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)
            || !PyArg_ParseTuple(args, "n:Counts", &size))
        return NULL;
    if (size < 0 || size > 1 << 16) {
        PyErr_SetString(PyExc_ValueError, "Counts(size): a size of 0 to 65536");
        return NULL;
    }
    if ((c = (Counts *)type->tp_alloc(type, size)) == NULL)
        return NULL;
    memset(c->count, 0, (size_t)size * sizeof(int64_t));
    return (PyObject *)c;
}

static Py_ssize_t
Counts_length(Counts *c)
{
    return Py_SIZE(c);
}

static PyObject *
Counts_item(Counts *c, Py_ssize_t i)
{
    if (i < 0 || i >= Py_SIZE(c)) {
        PyErr_SetString(PyExc_IndexError, "Counts index out of range");
        return NULL;
    }
    return PyLong_FromLongLong(c->count[i]);
}

static int
Counts_ass_item(Counts *c, Py_ssize_t i, PyObject *value)
{
    long long n;
    int overflow = 0;
    if (i < 0 || i >= Py_SIZE(c)) {
        PyErr_SetString(PyExc_IndexError, "Counts assignment index out of range");
        return -1;
    }
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "Counts items cannot be deleted");
        return -1;
    }
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        PyErr_Format(PyExc_TypeError, "a count is an int, not %.100s", Py_TYPE(value)->tp_name);
        return -1;
    }
    n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (overflow || n < 0) {
        PyErr_SetString(PyExc_OverflowError, "a count is 0 to 2**63 - 1");
        return -1;
    }
    c->count[i] = n;
    return 0;
}

/* "Name([items])": the repr of a sequence type that stands in for a list. */
static PyObject *
repr_as_list(PyObject *sequence)
{
    const char *name = strrchr(Py_TYPE(sequence)->tp_name, '.');
    PyObject *list = PySequence_List(sequence), *text;
    if (list == NULL)
        return NULL;
    text = PyUnicode_FromFormat("%s(%R)", name ? name + 1 : Py_TYPE(sequence)->tp_name, list);
    Py_DECREF(list);
    return text;
}

static PySequenceMethods Counts_as_sequence = {
    .sq_length = (lenfunc)Counts_length,
    .sq_item = (ssizeargfunc)Counts_item,
    .sq_ass_item = (ssizeobjargproc)Counts_ass_item,
};

static PyTypeObject CountsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.Counts",
    .tp_basicsize = offsetof(Counts, count),
    .tp_itemsize = sizeof(int64_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counts(size): size 64-bit counts, all 0 (see guardntp/_fastlane.c)",
    .tp_new = Counts_new,
    .tp_repr = repr_as_list,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_as_sequence = &Counts_as_sequence,
};

/* ------------------------------------------------------------------ Record */

/*
 * A per-source record: a fixed-length sequence that behaves like the list
 * Pipeline used to keep (record[i], record[i] = v, len, iteration), stored as
 * one object of two cache lines (12 cells; a prefix record is the same type
 * with one cell, its TAT). A cell holds either a 64-bit integer, kept
 * unboxed, or a reference to any other object (the label, the cached access-list
 * entry). Why: a million sources as lists of int objects cost 8-10 cache misses
 * per packet and ~500 bytes each; a Record costs four lines and ~200 bytes, and
 * the compiled loop updates it without allocating.
 *
 * Not tracked by the cyclic GC: its objects are strings, None and access-list
 * entries, none of which refer back to a record. That also keeps a million
 * records out of every full collection.
 */
#define RECORD_CELLS 21      /* a source record; a prefix record has 1 cell */
#define RECORD_MAX_CELLS 32  /* the width of the objects bitmap */

typedef struct {
    PyObject_VAR_HEAD                  /* ob_size: the number of cells */
    uint32_t objects;                  /* bit i set: cell i holds cell[i].o */
    union { int64_t n; PyObject *o; } cell[1];
} Record;

static PyTypeObject RecordType;

#define IS_OBJECT(r, i) (((r)->objects >> (i)) & 1u)

/* The pipeline's budgets (reference.GLOBAL_TAT, KOD_TAT): a two-cell Record,
 * checked at configure() to be one and at each begin() to hold two ints. */
#define BUDGET_GLOBAL 0
#define BUDGET_KOD 1
#define BUDGET_CELLS 2
#define BUDGET(L, i) (((Record *)(L)->budgets)->cell[i].n)

static int
budgets_in_cells(PyObject *budgets)
{
    return !IS_OBJECT((Record *)budgets, BUDGET_GLOBAL)
           && !IS_OBJECT((Record *)budgets, BUDGET_KOD);
}

static int
record_store(Record *r, Py_ssize_t i, PyObject *value)
{
    int overflow = 0;
    long long n = 0;
    PyObject *old = IS_OBJECT(r, i) ? r->cell[i].o : NULL;
    if (PyLong_CheckExact(value)) {
        n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred())
            return -1;
    }
    if (PyLong_CheckExact(value) && !overflow) {
        r->cell[i].n = n;
        r->objects &= ~(1u << i);
    } else {
        Py_INCREF(value);
        r->cell[i].o = value;
        r->objects |= 1u << i;
    }
    Py_XDECREF(old);
    return 0;
}

static PyObject *
Record_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *items, *seq;
    Record *r;
    Py_ssize_t i, size;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "Record takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:Record", &items))
        return NULL;
    seq = PySequence_Fast(items, "Record takes a sequence");
    if (seq == NULL)
        return NULL;
    size = PySequence_Fast_GET_SIZE(seq);
    if (size < 1 || size > RECORD_MAX_CELLS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "a Record has 1 to %d items", RECORD_MAX_CELLS);
        return NULL;
    }
    r = (Record *)type->tp_alloc(type, size);
    if (r == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (i = 0; i < size; i++)
        if (record_store(r, i, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            Py_DECREF(r);
            return NULL;
        }
    Py_DECREF(seq);
    return (PyObject *)r;
}

static void
Record_dealloc(Record *r)
{
    Py_ssize_t i;
    for (i = 0; i < Py_SIZE(r); i++)
        if (IS_OBJECT(r, i))
            Py_DECREF(r->cell[i].o);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static Py_ssize_t
Record_length(Record *r)
{
    return Py_SIZE(r);
}

static PyObject *
Record_item(Record *r, Py_ssize_t i)
{
    if (i < 0 || i >= Py_SIZE(r)) {
        PyErr_SetString(PyExc_IndexError, "Record index out of range");
        return NULL;
    }
    if (IS_OBJECT(r, i)) {
        Py_INCREF(r->cell[i].o);
        return r->cell[i].o;
    }
    return PyLong_FromLongLong(r->cell[i].n);
}

static int
Record_ass_item(Record *r, Py_ssize_t i, PyObject *value)
{
    if (i < 0 || i >= Py_SIZE(r)) {
        PyErr_SetString(PyExc_IndexError, "Record assignment index out of range");
        return -1;
    }
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "Record items cannot be deleted");
        return -1;
    }
    return record_store(r, i, value);
}

static PyObject *
Record_richcompare(PyObject *a, PyObject *b, int op)
{
    PyObject *left, *right, *result;
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(a, &RecordType)
            || !(PyObject_TypeCheck(b, &RecordType) || PyList_Check(b)))
        Py_RETURN_NOTIMPLEMENTED;
    left = PySequence_List(a);
    right = PySequence_List(b);
    result = left && right ? PyObject_RichCompare(left, right, op) : NULL;
    Py_XDECREF(left);
    Py_XDECREF(right);
    return result;
}

static PySequenceMethods Record_as_sequence = {
    .sq_length = (lenfunc)Record_length,
    .sq_item = (ssizeargfunc)Record_item,
    .sq_ass_item = (ssizeobjargproc)Record_ass_item,
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.Record",
    .tp_basicsize = offsetof(Record, cell),
    .tp_itemsize = sizeof(((Record *)0)->cell[0]),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Record(items): a fixed-length record of 1-32 cells (see guardntp/_fastlane.c)",
    .tp_new = Record_new,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_repr = repr_as_list,
    .tp_richcompare = Record_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_as_sequence = &Record_as_sequence,
};

/* ------------------------------------------------------------------ AddressTable */

/*
 * A BucketTable's records (filter/buckets.py): an insertion-ordered map from
 * an address key to its record, in C. Keys are what Pipeline makes of an
 * address: 1-16 bytes (an IPv4 address or prefix, an IPv6 source prefix) or 17
 * (b"6" and a 16-byte IPv6 prefix). It is the one table the compiled loop and
 * Pipeline.decide both read and write: Python sees a mapping with
 * OrderedDict's methods (get, [], del, in, len, iteration oldest first, items,
 * pop, move_to_end); C sees a slot per key with the record in it.
 *
 * Why: a dict lookup in the million-source table is three dependent cache and
 * TLB misses (index, entry, key object) plus a bytes key to build and hash; an
 * eviction (second chance: the oldest entry goes if its bucket is full, else it
 * moves to the back) was an iterator, a dict delete and a method call. Here a
 * lookup is one slot, the order is two links in it, and pump() prefetches a
 * whole batch's slots and records before deciding any of them.
 *
 * The hash is keyed with a random per-process seed, so a spoofing attacker
 * cannot choose addresses that share a probe run. Linear probing, at most half
 * full, deletion by backward shift (no tombstones; a moved slot's neighbours
 * in the order are re-pointed). Holds a reference to each value; not tracked by
 * the cyclic GC (records refer to nothing that could lead back here). Slots
 * come from PyMem_Raw*, so tracemalloc (contrib/sizing/measure.py) counts them.
 */
typedef struct {
    uint64_t hi, lo;       /* the key's bytes as a 128-bit big-endian integer */
    uint32_t length;       /* 1-16, or 17: b"6" then 16 bytes (hi, lo: those 16); 0: none */
} Key;

#define NIL UINT32_MAX

typedef struct {
    uint64_t hi, lo;
    PyObject *value;
    uint32_t prev, next;   /* slots of the neighbours in insertion order, NIL at the ends */
    uint32_t length;       /* 0 in an empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint64_t mask;         /* capacity - 1, capacity a power of two */
    Py_ssize_t count;
    uint32_t head, tail;   /* the oldest and the newest entry's slots, NIL when empty */
    uint64_t version;      /* moves on every change of membership or order */
} AddressTable;

static PyTypeObject AddressTableType;
static uint64_t index_seed;

#define TABLE_MIN_CAPACITY 16
#define TABLE_MAX_CAPACITY (1ULL << 32)   /* slot numbers are 32 bits, NIL excluded */
#define MAX_KEY 17
#define V6_TAG '6'

static inline uint64_t
index_hash(Key key)
{
    uint64_t x = (key.lo ^ index_seed) + key.length * 0x9E3779B97F4A7C15ULL;
    x ^= key.hi * 0xD6E8FEB86659FD93ULL;
    x ^= x >> 30;          /* splitmix64's finaliser */
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline int
key_equal(Key a, Key b)
{
    return a.lo == b.lo && a.hi == b.hi && a.length == b.length;
}

static inline int
slot_is(const Slot *s, Key key)
{
    return s->lo == key.lo && s->hi == key.hi && s->length == key.length;
}

static inline Key
slot_key(const Slot *s)
{
    Key key = {s->hi, s->lo, s->length};
    return key;
}

/* The key of 1-16 address bytes. */
static inline Key
address_key(const unsigned char *bytes, int length)
{
    Key key = {0, 0, (uint32_t)length};
    int i;
    for (i = 0; i < length; i++) {
        key.hi = (key.hi << 8) | (key.lo >> 56);
        key.lo = (key.lo << 8) | bytes[i];
    }
    return key;
}

/* The key of a bytes object; length 0 when no address key is (not 1-16 bytes,
 * nor 17 starting with b"6"). */
static Key
key_of(PyObject *object)
{
    Key none = {0, 0, 0}, key;
    const unsigned char *bytes;
    Py_ssize_t length;
    if (!PyBytes_Check(object))
        return none;
    bytes = (const unsigned char *)PyBytes_AS_STRING(object);
    length = PyBytes_GET_SIZE(object);
    if (length >= 1 && length <= 16)
        return address_key(bytes, (int)length);
    if (length != MAX_KEY || bytes[0] != V6_TAG)
        return none;
    key = address_key(bytes + 1, 16);
    key.length = MAX_KEY;
    return key;
}

static PyObject *
key_bytes(Key key)
{
    unsigned char bytes[MAX_KEY];
    int b, length = key.length == MAX_KEY ? 16 : (int)key.length, at = key.length == MAX_KEY;
    bytes[0] = V6_TAG;
    for (b = 0; b < length; b++) {
        int shift = 8 * (length - 1 - b);
        bytes[at + b] = (unsigned char)(shift >= 64 ? key.hi >> (shift - 64) : key.lo >> shift);
    }
    return PyBytes_FromStringAndSize((const char *)bytes, at + length);
}

static inline Slot *
table_home(AddressTable *t, Key key)
{
    return &t->slots[index_hash(key) & t->mask];
}

/* The slot holding key, or NIL. */
static inline uint32_t
table_slot(AddressTable *t, Key key)
{
    uint64_t i = index_hash(key) & t->mask;
    for (;;) {
        Slot *s = &t->slots[i];
        if (slot_is(s, key))
            return (uint32_t)i;
        if (s->length == 0)
            return NIL;
        i = (i + 1) & t->mask;
    }
}

/* The value under key (borrowed), or NULL. */
static inline PyObject *
table_find(AddressTable *t, Key key)
{
    uint32_t i = table_slot(t, key);
    return i == NIL ? NULL : t->slots[i].value;
}

static void
table_unlink(AddressTable *t, uint32_t i)
{
    Slot *s = &t->slots[i];
    if (s->prev == NIL)
        t->head = s->next;
    else
        t->slots[s->prev].next = s->next;
    if (s->next == NIL)
        t->tail = s->prev;
    else
        t->slots[s->next].prev = s->prev;
}

static void
table_append(AddressTable *t, uint32_t i)
{
    Slot *s = &t->slots[i];
    s->prev = t->tail;
    s->next = NIL;
    if (t->tail == NIL)
        t->head = i;
    else
        t->slots[t->tail].next = i;
    t->tail = i;
}

/* Place key (absent) in its probe run at the back of the order, holding value
 * (a reference is taken). Room must have been made. */
static void
table_place(AddressTable *t, Key key, PyObject *value)
{
    uint64_t i = index_hash(key) & t->mask;
    while (t->slots[i].length != 0)
        i = (i + 1) & t->mask;
    t->slots[i].hi = key.hi;
    t->slots[i].lo = key.lo;
    t->slots[i].length = key.length;
    Py_INCREF(value);
    t->slots[i].value = value;
    table_append(t, (uint32_t)i);
    t->count++;
}

/* Twice the slots, the same order (walked from the oldest). */
static int
table_grow(AddressTable *t)
{
    uint64_t capacity = (t->mask + 1) * 2;
    Slot *old = t->slots, *fresh;
    uint32_t i;
    if (capacity > TABLE_MAX_CAPACITY) {
        PyErr_SetString(PyExc_MemoryError, "an AddressTable holds at most 2**31 keys");
        return -1;
    }
    fresh = PyMem_RawCalloc(capacity, sizeof(Slot));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    i = t->head;
    t->slots = fresh;
    t->mask = capacity - 1;
    t->head = t->tail = NIL;
    t->count = 0;
    while (i != NIL) {
        Slot *s = &old[i];
        PyObject *value = s->value;
        table_place(t, slot_key(s), value);
        Py_DECREF(value);   /* table_place took its own */
        i = s->next;
    }
    PyMem_RawFree(old);
    return 0;
}

/* table[key] = value: a new key goes to the back, an existing one keeps its place. */
static int
table_put(AddressTable *t, Key key, PyObject *value)
{
    uint32_t i = table_slot(t, key);
    if (i != NIL) {
        Py_INCREF(value);
        Py_SETREF(t->slots[i].value, value);
        return 0;
    }
    if ((uint64_t)(t->count + 1) * 2 > t->mask + 1 && table_grow(t) < 0)
        return -1;
    table_place(t, key, value);
    t->version++;
    return 0;
}

/* Remove the entry in slot i; its value (the reference the table held). */
static PyObject *
table_remove_slot(AddressTable *t, uint32_t hole)
{
    uint64_t i = hole, j = hole;
    PyObject *value = t->slots[hole].value;
    table_unlink(t, hole);
    /* Backward shift: pull later members of the probe run into the hole, unless
     * their home lies cyclically in (hole, j]; a moved entry's neighbours in the
     * order learn its new slot. */
    for (;;) {
        uint64_t home;
        Slot *s;
        j = (j + 1) & t->mask;
        s = &t->slots[j];
        if (s->length == 0)
            break;
        home = index_hash(slot_key(s)) & t->mask;
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        t->slots[i] = *s;
        if (s->prev == NIL)
            t->head = (uint32_t)i;
        else
            t->slots[s->prev].next = (uint32_t)i;
        if (s->next == NIL)
            t->tail = (uint32_t)i;
        else
            t->slots[s->next].prev = (uint32_t)i;
        i = j;
    }
    memset(&t->slots[i], 0, sizeof(Slot));
    t->count--;
    t->version++;
    return value;
}

/* Remove key; the removed value (a new reference) or NULL if absent. */
static PyObject *
table_pop(AddressTable *t, Key key)
{
    uint32_t i = table_slot(t, key);
    return i == NIL ? NULL : table_remove_slot(t, i);
}

static void
table_move_to_end(AddressTable *t, uint32_t i)
{
    if (t->tail == i)
        return;
    table_unlink(t, i);
    table_append(t, i);
    t->version++;
}

static void
table_clear(AddressTable *t)
{
    uint64_t i;
    for (i = 0; i <= t->mask; i++)
        if (t->slots[i].length != 0) {
            PyObject *value = t->slots[i].value;
            memset(&t->slots[i], 0, sizeof(Slot));
            Py_DECREF(value);
        }
    t->count = 0;
    t->head = t->tail = NIL;
    t->version++;
}

static void
set_key_error(PyObject *key)
{
    PyObject *args = PyTuple_Pack(1, key);
    if (args != NULL) {
        PyErr_SetObject(PyExc_KeyError, args);
        Py_DECREF(args);
    }
}

/* A key argument from Python: its Key, or length 0 with KeyError set. */
static Key
key_arg(PyObject *key)
{
    Key k = key_of(key);
    if (k.length == 0) {
        if (PyBytes_Check(key))
            set_key_error(key);
        else
            PyErr_Format(PyExc_TypeError, "AddressTable keys are bytes, not %.100s",
                         Py_TYPE(key)->tp_name);
    }
    return k;
}

static PyObject *
AddressTable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    AddressTable *t;
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "AddressTable() takes no arguments");
        return NULL;
    }
    t = (AddressTable *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->head = t->tail = NIL;
    t->slots = PyMem_RawCalloc(TABLE_MIN_CAPACITY, sizeof(Slot));
    if (t->slots == NULL) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    t->mask = TABLE_MIN_CAPACITY - 1;
    return (PyObject *)t;
}

static void
AddressTable_dealloc(AddressTable *t)
{
    if (t->slots != NULL) {
        table_clear(t);
        PyMem_RawFree(t->slots);
    }
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t
AddressTable_length(AddressTable *t)
{
    return t->count;
}

static int
AddressTable_contains(AddressTable *t, PyObject *key)
{
    Key k = key_of(key);
    return k.length != 0 && table_slot(t, k) != NIL;
}

static PyObject *
AddressTable_subscript(AddressTable *t, PyObject *key)
{
    Key k = key_arg(key);
    PyObject *value;
    if (k.length == 0)
        return NULL;
    if ((value = table_find(t, k)) == NULL) {
        set_key_error(key);
        return NULL;
    }
    Py_INCREF(value);
    return value;
}

static int
AddressTable_ass_subscript(AddressTable *t, PyObject *key, PyObject *value)
{
    Key k = value != NULL ? key_of(key) : key_arg(key);
    if (k.length == 0) {
        if (value != NULL)
            PyErr_Format(PyExc_ValueError, "an AddressTable key is 1-16 bytes or b'6' and 16 "
                         "bytes, not %R", key);
        return -1;
    }
    if (value != NULL)
        return table_put(t, k, value);
    if ((value = table_pop(t, k)) == NULL) {
        set_key_error(key);
        return -1;
    }
    Py_DECREF(value);
    return 0;
}

static PyObject *
AddressTable_get(AddressTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    Key k;
    PyObject *value;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    k = key_of(args[0]);
    value = k.length != 0 ? table_find(t, k) : NULL;
    if (value == NULL)
        value = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(value);
    return value;
}

static PyObject *
AddressTable_pop(AddressTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    Key k;
    PyObject *value;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    k = key_of(args[0]);
    value = k.length != 0 ? table_pop(t, k) : NULL;
    if (value != NULL)
        return value;
    if (nargs == 2) {
        Py_INCREF(args[1]);
        return args[1];
    }
    if (key_arg(args[0]).length != 0)
        set_key_error(args[0]);
    return NULL;
}

static PyObject *
AddressTable_move_to_end(AddressTable *t, PyObject *key)
{
    Key k = key_arg(key);
    uint32_t i;
    if (k.length == 0)
        return NULL;
    if ((i = table_slot(t, k)) == NIL) {
        set_key_error(key);
        return NULL;
    }
    table_move_to_end(t, i);
    Py_RETURN_NONE;
}

static PyObject *
AddressTable_clear(AddressTable *t, PyObject *unused)
{
    (void)unused;
    table_clear(t);
    Py_RETURN_NONE;
}

enum { VIEW_KEYS, VIEW_VALUES, VIEW_ITEMS };

/* keys(), values(), items(): lists, oldest first (a snapshot: the table may change). */
static PyObject *
table_list(AddressTable *t, int view)
{
    PyObject *list = PyList_New(t->count);
    uint32_t i = t->head;
    Py_ssize_t n = 0;
    if (list == NULL)
        return NULL;
    for (; i != NIL; i = t->slots[i].next, n++) {
        Slot *s = &t->slots[i];
        PyObject *item, *key = view == VIEW_VALUES ? NULL : key_bytes(slot_key(s));
        if (view != VIEW_VALUES && key == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        if (view == VIEW_KEYS)
            item = key;
        else if (view == VIEW_VALUES) {
            Py_INCREF(s->value);
            item = s->value;
        } else {
            item = PyTuple_Pack(2, key, s->value);
            Py_DECREF(key);
            if (item == NULL) {
                Py_DECREF(list);
                return NULL;
            }
        }
        PyList_SET_ITEM(list, n, item);
    }
    return list;
}

static PyObject *
AddressTable_keys(AddressTable *t, PyObject *unused)
{
    (void)unused;
    return table_list(t, VIEW_KEYS);
}

static PyObject *
AddressTable_values(AddressTable *t, PyObject *unused)
{
    (void)unused;
    return table_list(t, VIEW_VALUES);
}

static PyObject *
AddressTable_items(AddressTable *t, PyObject *unused)
{
    (void)unused;
    return table_list(t, VIEW_ITEMS);
}

/* iter(table): its keys oldest first, lazily (next(iter(table)) is the oldest in
 * O(1)); like a dict's, it fails once the table has changed under it. */
typedef struct {
    PyObject_HEAD
    AddressTable *table;
    uint32_t slot;
    uint64_t version;
} TableIterator;

static PyTypeObject TableIteratorType;

static PyObject *
AddressTable_iter(AddressTable *t)
{
    TableIterator *it = PyObject_New(TableIterator, &TableIteratorType);
    if (it == NULL)
        return NULL;
    Py_INCREF(t);
    it->table = t;
    it->slot = t->head;
    it->version = t->version;
    return (PyObject *)it;
}

static void
TableIterator_dealloc(TableIterator *it)
{
    Py_DECREF(it->table);
    PyObject_Free(it);
}

static PyObject *
TableIterator_next(TableIterator *it)
{
    AddressTable *t = it->table;
    Slot *s;
    if (it->version != t->version) {
        PyErr_SetString(PyExc_RuntimeError, "AddressTable changed during iteration");
        return NULL;
    }
    if (it->slot == NIL)
        return NULL;
    s = &t->slots[it->slot];
    it->slot = s->next;
    return key_bytes(slot_key(s));
}

static PyTypeObject TableIteratorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.AddressTableIterator",
    .tp_basicsize = sizeof(TableIterator),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)TableIterator_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)TableIterator_next,
};

static PyMethodDef AddressTable_methods[] = {
    {"get", (PyCFunction)(void (*)(void))AddressTable_get, METH_FASTCALL,
     "get(key, default=None) -> the value under key, else default"},
    {"pop", (PyCFunction)(void (*)(void))AddressTable_pop, METH_FASTCALL,
     "pop(key[, default]) -> remove key and return its value"},
    {"move_to_end", (PyCFunction)AddressTable_move_to_end, METH_O,
     "move_to_end(key): make key the newest entry"},
    {"clear", (PyCFunction)AddressTable_clear, METH_NOARGS, "remove every key"},
    {"keys", (PyCFunction)AddressTable_keys, METH_NOARGS, "keys() -> [key], oldest first"},
    {"values", (PyCFunction)AddressTable_values, METH_NOARGS,
     "values() -> [value], oldest first"},
    {"items", (PyCFunction)AddressTable_items, METH_NOARGS,
     "items() -> [(key, value)], oldest first"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods AddressTable_as_sequence = {
    .sq_contains = (objobjproc)AddressTable_contains,
};

static PyMappingMethods AddressTable_as_mapping = {
    .mp_length = (lenfunc)AddressTable_length,
    .mp_subscript = (binaryfunc)AddressTable_subscript,
    .mp_ass_subscript = (objobjargproc)AddressTable_ass_subscript,
};

static PyTypeObject AddressTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.AddressTable",
    .tp_basicsize = sizeof(AddressTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AddressTable(): address keys (1-16 bytes, or b'6' + 16) -> objects, "
              "insertion-ordered (see guardntp/_fastlane.c)",
    .tp_new = AddressTable_new,
    .tp_dealloc = (destructor)AddressTable_dealloc,
    .tp_iter = (getiterfunc)AddressTable_iter,
    .tp_methods = AddressTable_methods,
    .tp_as_sequence = &AddressTable_as_sequence,
    .tp_as_mapping = &AddressTable_as_mapping,
};

#define SOURCE_TABLE(L) ((AddressTable *)(L)->index)
#define PREFIX_TABLE(L) ((AddressTable *)(L)->prefix_index)

/* ------------------------------------------------------------------ BlockTable */

/*
 * The access list's blocklist layer (filter/acl.py, guardntp/blocklist): a
 * network (its address, host bits zero, and prefix length) -> a verdict, the
 * object a lookup returns (its action, origin, reason and expires_ns). An
 * import or the auto-blocker writes many entries with one verdict object.
 *
 * Why: an entry as Python objects (an AclEntry in an AddressTable slot, its
 * bytes key) costs ~350 bytes, and the blocklist may hold a million. Here an
 * entry is one slot: {network address, verdict id}, 8 bytes for IPv4, 16 for
 * an IPv6 network of /64 or shorter (its first half is the whole network) and
 * 20 for a longer one. As a table grows, an IPv4 entry costs 16-32 bytes, an
 * IPv6 /64 32-64 and a longer IPv6 network 30-60 (its table may be 2/3 full).
 * The verdict is not a pointer in the slot but a 32-bit id into an array that
 * holds one reference per distinct verdict object and its
 * use count (how many entries hold it); at a use count of 0 the reference is
 * released and the id reused. A small open-addressed index over the objects'
 * addresses finds a verdict's id, so a write costs no Python object either.
 *
 * Layout: one sub-table per prefix code (IPv4 /0-/32: codes 0-32, IPv6
 * /0-/128: 33-161, as acl.py's _WHERE), allocated only while it holds entries,
 * and per family a bitmap of the prefix lengths in use, so a lookup probes only
 * those, longest first (longest_match_in), merged with the configuration's.
 * Each sub-table: capacity a power of two, at least 8, at most half full (2/3
 * for Block6 slots), halved when a deletion leaves it under 1/8 full; the hash
 * is index_hash, keyed with the process's random seed (a spoofing attacker
 * cannot choose addresses that share a probe run) with the prefix code mixed
 * in; linear probing, deletion by backward shift (no tombstones). Emptied and
 * shrunk tables of 1 MiB or more are retired and given back by release().
 *
 * apply() is all or nothing: it checks every op, then makes every allocation
 * the writes could need (new sub-tables, growth, room for new verdicts), then
 * writes with operations that cannot fail; the references it let go are
 * released only once the table is whole again, since a verdict's finaliser may
 * run Python code that reads or changes the table. purge() removes the entries
 * of some verdicts (an import replaced or withdrawn) a bounded number of slots
 * per call, resumable from a cursor, so a million entries go over several
 * timer ticks without stalling the packet loop; for the same reason it rehashes
 * no sub-table bigger than its budget: the shrink is left to the next apply().
 *
 * Not tracked by the cyclic GC: verdicts refer to enums, strings and ints, none
 * of which leads back here. Slots and the verdict arrays come from PyMem_Raw*,
 * so tracemalloc (contrib/sizing/measure.py) counts them.
 */
#define BLOCK_CODES 162                  /* IPv4 /0-/32: codes 0-32; IPv6 /0-/128: 33-161 */
#define BLOCK_V6 33                      /* the code of IPv6 /0 */
#define BLOCK_MIN_CAPACITY 8
#define BLOCK_MAX_CAPACITY (1ULL << 31)  /* a slot number and the cursor's fit 32 bits */
#define BLOCK_MAX_ENTRIES (UINT32_MAX - 1)   /* a use count is 32 bits */
#define BLOCK_MAX_VERDICTS (1U << 30)

typedef struct {
    uint32_t key;          /* the network address */
    uint32_t id;           /* its verdict's, 0 in an empty slot */
} Block4;

typedef struct {
    uint64_t hi;           /* an IPv6 network of /0-/64: its address's first half */
    uint32_t id;
    uint32_t spare;
} Block6n;

typedef struct __attribute__((packed)) {
    uint64_t hi, lo;       /* an IPv6 network of /65-/128: its address, big-endian halves */
    uint32_t id;           /* (packed: 20 bytes, not 24) */
} Block6;

#define BLOCK_V6_WIDE (BLOCK_V6 + 65)    /* the code of IPv6 /65, the first with a Block6 */

typedef struct {
    void *slots;           /* Block4 (codes 0-32), Block6n (IPv6 /0-/64) or Block6; NULL
                            * while the length holds nothing */
    uint32_t mask;         /* capacity - 1 */
    uint32_t count;
} BlockSub;

/* An emptied or shrunk sub-table's old slots, given back to the kernel a slice
 * at a time (release()) rather than in one free(): unmapping the 16 MB of a
 * million IPv4 entries at once would hold the packet loop for milliseconds. */
typedef struct {
    void *memory;
    uintptr_t next, end;   /* the whole pages inside it not given back yet */
} Retired;

#define BLOCK_RETIRE_MIN ((size_t)1 << 20)   /* smaller arrays are freed at once */

typedef struct {
    PyObject *object;      /* a reference held; NULL: a free id */
    uint32_t uses;         /* entries holding it; of a free id, the next free id (0: none) */
    uint32_t marked;       /* one of the verdicts purge() is removing */
} Verdict;

typedef struct {
    PyObject_HEAD
    BlockSub sub[BLOCK_CODES];
    uint64_t used[2][3];   /* per family (IPv4, IPv6): bit p set while /p holds entries */
    uint64_t loose[3];     /* by code: sub-tables purge() left under 1/8 full, for apply() */
    Py_ssize_t count;
    Verdict *verdicts;     /* by id; [0] unused */
    uint32_t room;         /* ids the array has room for */
    uint32_t top;          /* ids below it have been handed out (1: none) */
    uint32_t free_id;      /* the last id released, 0: none */
    uint32_t n_verdicts;   /* distinct verdicts held */
    uint32_t *vindex;      /* verdict ids by their object's address; 0: an empty slot */
    uint32_t vmask;        /* its capacity - 1 */
    Retired *retired;      /* slots waiting to be given back (release()) */
    size_t n_retired, retired_room;
    uint64_t version;      /* moves on every change (the lists built from it check it) */
} BlockTable;

static PyTypeObject BlockTableType;

static inline void
bit_set(uint64_t *bits, int i)
{
    bits[i >> 6] |= 1ULL << (i & 63);
}

static inline void
bit_clear(uint64_t *bits, int i)
{
    bits[i >> 6] &= ~(1ULL << (i & 63));
}

static inline int
bit_test(const uint64_t *bits, int i)
{
    return (bits[i >> 6] >> (i & 63)) & 1;
}

/* The highest bit below `below` set in bits (three words), or -1: the longest
 * prefix length in use shorter than below. */
static inline int
longest_below(const uint64_t *bits, int below)
{
    while (below > 0) {
        int p = below - 1, w = p >> 6;
        uint64_t word = bits[w] & (UINT64_MAX >> (63 - (p & 63)));
        if (word != 0)
            return w * 64 + 63 - __builtin_clzll(word);
        below = w * 64;
    }
    return -1;
}

/* The top n bits of a 64-bit word set (n clamped to 0-64). */
static inline uint64_t
high_bits(int n)
{
    return n <= 0 ? 0 : n >= 64 ? UINT64_MAX : UINT64_MAX << (64 - n);
}

/* The network of prefix code `code` that covers the address (hi, lo). */
static inline void
network_of(int code, uint64_t *hi, uint64_t *lo)
{
    if (code < BLOCK_V6)
        *lo &= high_bits(code) >> 32;
    else {
        *hi &= high_bits(code - BLOCK_V6);
        *lo &= high_bits(code - BLOCK_V6 - 64);
    }
}

static inline uint64_t
block_hash(int code, uint64_t hi, uint64_t lo)
{
    Key key = {hi, lo, (uint32_t)code + 1};
    return index_hash(key);
}

static inline size_t
slot_size(int code)
{
    return code < BLOCK_V6 ? sizeof(Block4) : code < BLOCK_V6_WIDE ? sizeof(Block6n)
                                                                   : sizeof(Block6);
}

static inline uint32_t
sub_id(const BlockSub *s, int code, uint64_t i)
{
    return code < BLOCK_V6 ? ((const Block4 *)s->slots)[i].id
           : code < BLOCK_V6_WIDE ? ((const Block6n *)s->slots)[i].id
           : ((const Block6 *)s->slots)[i].id;
}

static inline void
sub_key(const BlockSub *s, int code, uint64_t i, uint64_t *hi, uint64_t *lo)
{
    if (code < BLOCK_V6) {
        *hi = 0;
        *lo = ((const Block4 *)s->slots)[i].key;
    } else if (code < BLOCK_V6_WIDE) {
        *hi = ((const Block6n *)s->slots)[i].hi;
        *lo = 0;
    } else {
        *hi = ((const Block6 *)s->slots)[i].hi;
        *lo = ((const Block6 *)s->slots)[i].lo;
    }
}

static inline void
sub_set_id(BlockSub *s, int code, uint64_t i, uint32_t id)
{
    if (code < BLOCK_V6)
        ((Block4 *)s->slots)[i].id = id;
    else if (code < BLOCK_V6_WIDE)
        ((Block6n *)s->slots)[i].id = id;
    else
        ((Block6 *)s->slots)[i].id = id;
}

/* The slot of network (hi, lo) in sub-table code, or -1. */
static inline int64_t
sub_find(const BlockSub *s, int code, uint64_t hi, uint64_t lo)
{
    uint64_t i;
    if (s->slots == NULL)
        return -1;
    i = block_hash(code, hi, lo) & s->mask;
    if (code < BLOCK_V6) {
        const Block4 *slots = s->slots;
        for (;; i = (i + 1) & s->mask) {
            if (slots[i].id == 0)
                return -1;
            if (slots[i].key == (uint32_t)lo)
                return (int64_t)i;
        }
    } else if (code < BLOCK_V6_WIDE) {
        const Block6n *slots = s->slots;
        for (;; i = (i + 1) & s->mask) {
            if (slots[i].id == 0)
                return -1;
            if (slots[i].hi == hi)
                return (int64_t)i;
        }
    } else {
        const Block6 *slots = s->slots;
        for (;; i = (i + 1) & s->mask) {
            if (slots[i].id == 0)
                return -1;
            if (slots[i].lo == lo && slots[i].hi == hi)
                return (int64_t)i;
        }
    }
}

/* Place network (hi, lo), absent, holding verdict id. Room must have been made. */
static void
sub_place(BlockSub *s, int code, uint64_t hi, uint64_t lo, uint32_t id)
{
    uint64_t i = block_hash(code, hi, lo) & s->mask;
    if (code < BLOCK_V6) {
        Block4 *slots = s->slots;
        while (slots[i].id != 0)
            i = (i + 1) & s->mask;
        slots[i].key = (uint32_t)lo;
        slots[i].id = id;
    } else if (code < BLOCK_V6_WIDE) {
        Block6n *slots = s->slots;
        while (slots[i].id != 0)
            i = (i + 1) & s->mask;
        slots[i].hi = hi;
        slots[i].id = id;
    } else {
        Block6 *slots = s->slots;
        while (slots[i].id != 0)
            i = (i + 1) & s->mask;
        slots[i].hi = hi;
        slots[i].lo = lo;
        slots[i].id = id;
    }
    s->count++;
}

/* Empty slot `hole`: pull later members of its probe run back into it unless
 * their home lies cyclically in (hole, j] (backward shift). The slots examined. */
static uint64_t
sub_remove(BlockSub *s, int code, uint64_t hole)
{
    uint64_t i = hole, j = hole, examined = 0, home, mask = s->mask;
    if (code < BLOCK_V6) {   /* (one loop per slot type: purge() spends its time here) */
        Block4 *slots = s->slots;
        for (;;) {
            j = (j + 1) & mask;
            examined++;
            if (slots[j].id == 0)
                break;
            home = block_hash(code, 0, slots[j].key) & mask;
            if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
                continue;
            slots[i] = slots[j];
            i = j;
        }
        slots[i].key = slots[i].id = 0;
    } else if (code < BLOCK_V6_WIDE) {
        Block6n *slots = s->slots;
        for (;;) {
            j = (j + 1) & mask;
            examined++;
            if (slots[j].id == 0)
                break;
            home = block_hash(code, slots[j].hi, 0) & mask;
            if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
                continue;
            slots[i] = slots[j];
            i = j;
        }
        memset(&slots[i], 0, sizeof slots[i]);
    } else {
        Block6 *slots = s->slots;
        for (;;) {
            j = (j + 1) & mask;
            examined++;
            if (slots[j].id == 0)
                break;
            home = block_hash(code, slots[j].hi, slots[j].lo) & mask;
            if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
                continue;
            slots[i] = slots[j];
            i = j;
        }
        memset(&slots[i], 0, sizeof slots[i]);
    }
    s->count--;
    return examined;
}

/* The first slot in [from, end) holding an entry of a marked verdict, else end.
 * only: the one verdict marked (the common case: the ids compared, no load), or 0. */
static uint64_t
sub_scan(const BlockSub *s, int code, const Verdict *verdicts, uint32_t only, uint64_t from,
         uint64_t end)
{
    if (code < BLOCK_V6) {
        const Block4 *slots = s->slots;
        if (only != 0) {
            while (from < end && slots[from].id != only)
                from++;
            return from;
        }
        for (; from < end; from++)
            if (slots[from].id != 0 && verdicts[slots[from].id].marked)
                break;
    } else if (code < BLOCK_V6_WIDE) {
        const Block6n *slots = s->slots;
        for (; from < end; from++)
            if (slots[from].id != 0 && verdicts[slots[from].id].marked)
                break;
    } else {
        const Block6 *slots = s->slots;
        for (; from < end; from++)
            if (slots[from].id != 0 && verdicts[slots[from].id].marked)
                break;
    }
    return from;
}

/* Let go of a sub-table's old slots: a large array is retired (given back
 * in slices by release()), unless the list of them cannot grow; else freed. */
static void
slots_retire(BlockTable *t, void *memory, size_t bytes)
{
    if (memory == NULL)
        return;
    if (bytes >= BLOCK_RETIRE_MIN) {
        if (t->n_retired == t->retired_room) {
            size_t room = t->retired_room ? 2 * t->retired_room : 8;
            Retired *grown = PyMem_RawRealloc(t->retired, room * sizeof(Retired));
            if (grown != NULL) {
                t->retired = grown;
                t->retired_room = room;
            }
        }
        if (t->n_retired < t->retired_room) {
            /* (only whole pages inside the array: the allocator's own header
             * before it, and its neighbours, are never touched) */
            uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
            Retired *r = &t->retired[t->n_retired++];
            r->memory = memory;
            r->next = ((uintptr_t)memory + page - 1) & ~(page - 1);
            r->end = ((uintptr_t)memory + bytes) & ~(page - 1);
            if (r->end < r->next)
                r->end = r->next;
            return;
        }
    }
    PyMem_RawFree(memory);
}

/* Move sub-table code's entries into fresh (mask + 1 zeroed slots); the old
 * slots are freed, or with retire, retired (slots_retire). */
static void
sub_rehash(BlockTable *t, BlockSub *s, int code, void *fresh, uint32_t mask, int retire)
{
    BlockSub old = *s;
    uint64_t i, hi, lo;
    s->slots = fresh;
    s->mask = mask;
    s->count = 0;
    if (old.slots == NULL)
        return;
    for (i = 0; i <= old.mask; i++) {
        uint32_t id = sub_id(&old, code, i);
        if (id != 0) {
            sub_key(&old, code, i, &hi, &lo);
            sub_place(s, code, hi, lo, id);
        }
    }
    if (retire)
        slots_retire(t, old.slots, ((size_t)old.mask + 1) * slot_size(code));
    else
        PyMem_RawFree(old.slots);
}

/* The smallest capacity at which n entries leave a table at most half full. */
static uint64_t
capacity_for(uint64_t n)
{
    uint64_t capacity = BLOCK_MIN_CAPACITY;
    while (capacity < 2 * n)
        capacity *= 2;
    return capacity;
}

/* The same for sub-table code's entries: at most half full, but a table of
 * 20-byte Block6 slots at most 2/3 full, so that an entry costs 30-60 bytes
 * as it grows (at most half full it would be 40-80). */
static uint64_t
sub_capacity_for(int code, uint64_t n)
{
    uint64_t capacity = BLOCK_MIN_CAPACITY;
    if (code < BLOCK_V6_WIDE)
        return capacity_for(n);
    while (2 * capacity < 3 * n)
        capacity *= 2;
    return capacity;
}

/* The capacity a sub-table of capacity `capacity` holding `count` shrinks to
 * (itself: none): halved while under 1/8 full, not below the minimum. */
static uint64_t
shrunk_capacity(uint64_t capacity, uint64_t count)
{
    while (capacity > BLOCK_MIN_CAPACITY && count * 8 < capacity)
        capacity /= 2;
    return capacity;
}

static inline uint64_t
verdict_hash(PyObject *object)
{
    Key key = {0, (uint64_t)(uintptr_t)object, MAX_KEY + 1};
    return index_hash(key);
}

/* The id of verdict object, 0 if the table holds none. */
static inline uint32_t
verdict_id(const BlockTable *t, PyObject *object)
{
    uint64_t i;
    if (t->vindex == NULL)
        return 0;
    for (i = verdict_hash(object) & t->vmask;; i = (i + 1) & t->vmask) {
        uint32_t id = t->vindex[i];
        if (id == 0 || t->verdicts[id].object == object)
            return id;
    }
}

static void
vindex_place(BlockTable *t, uint32_t id)
{
    uint64_t i = verdict_hash(t->verdicts[id].object) & t->vmask;
    while (t->vindex[i] != 0)
        i = (i + 1) & t->vmask;
    t->vindex[i] = id;
}

/* Hold verdict object (absent) under a new id, no uses yet. Room must have been made. */
static uint32_t
verdict_add(BlockTable *t, PyObject *object)
{
    uint32_t id = t->free_id;
    if (id != 0)
        t->free_id = t->verdicts[id].uses;
    else
        id = t->top++;
    Py_INCREF(object);
    t->verdicts[id].object = object;
    t->verdicts[id].uses = 0;
    t->verdicts[id].marked = 0;
    vindex_place(t, id);
    t->n_verdicts++;
    return id;
}

/* Let go of verdict id (no entry holds it): the reference it held, for the
 * caller to release once the table is consistent. */
static PyObject *
verdict_drop(BlockTable *t, uint32_t id)
{
    PyObject *object = t->verdicts[id].object;
    uint64_t i = verdict_hash(object) & t->vmask, j, home;
    while (t->vindex[i] != id)
        i = (i + 1) & t->vmask;
    for (j = i;;) {   /* backward shift, as sub_remove */
        uint32_t moved;
        j = (j + 1) & t->vmask;
        if ((moved = t->vindex[j]) == 0)
            break;
        home = verdict_hash(t->verdicts[moved].object) & t->vmask;
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        t->vindex[i] = moved;
        i = j;
    }
    t->vindex[i] = 0;
    t->verdicts[id].object = NULL;
    t->verdicts[id].uses = t->free_id;
    t->verdicts[id].marked = 0;
    t->free_id = id;
    t->n_verdicts--;
    return object;
}

/* One entry fewer holds verdict id: its reference if that was the last (see
 * verdict_drop), else NULL. */
static PyObject *
verdict_unuse(BlockTable *t, uint32_t id)
{
    return --t->verdicts[id].uses == 0 ? verdict_drop(t, id) : NULL;
}

/* No verdict left: give back the arrays (the ids start again from 1). */
static void
verdicts_tidy(BlockTable *t)
{
    if (t->n_verdicts != 0 || t->verdicts == NULL)
        return;
    PyMem_RawFree(t->verdicts);
    PyMem_RawFree(t->vindex);
    t->verdicts = NULL;
    t->vindex = NULL;
    t->room = t->vmask = t->free_id = 0;
    t->top = 1;
}

static void
sub_free(BlockTable *t, int code)
{
    BlockSub *s = &t->sub[code];
    slots_retire(t, s->slots, ((size_t)s->mask + 1) * slot_size(code));
    s->slots = NULL;
    s->mask = s->count = 0;
    bit_clear(t->used[code >= BLOCK_V6], code < BLOCK_V6 ? code : code - BLOCK_V6);
    bit_clear(t->loose, code);
}

/* After writes to sub-table code: freed if empty, shrunk if under 1/8 full (if
 * the smaller slots cannot be had, it stays as it is and is tried again later). */
static void
sub_tidy(BlockTable *t, int code)
{
    BlockSub *s = &t->sub[code];
    uint64_t capacity, want;
    void *fresh;
    if (s->slots == NULL)
        return;
    if (s->count == 0) {
        sub_free(t, code);
        return;
    }
    capacity = (uint64_t)s->mask + 1;
    want = shrunk_capacity(capacity, s->count);
    bit_clear(t->loose, code);
    if (want == capacity)
        return;
    if ((fresh = PyMem_RawCalloc(want, slot_size(code))) == NULL) {
        bit_set(t->loose, code);
        return;
    }
    sub_rehash(t, s, code, fresh, (uint32_t)(want - 1), 1);
}

/* The network of a Python call: (packed, prefixlen) -> its code and address;
 * -1 with TypeError or ValueError set. */
static int
block_network(PyObject *packed, PyObject *prefixlen, int *code, uint64_t *hi, uint64_t *lo)
{
    const unsigned char *bytes;
    Py_ssize_t width;
    long bits;
    int overflow = 0;
    uint64_t host_hi, host_lo;
    Key key;
    if (!PyBytes_Check(packed)) {
        PyErr_Format(PyExc_TypeError, "a network address is bytes, not %.100s",
                     Py_TYPE(packed)->tp_name);
        return -1;
    }
    width = PyBytes_GET_SIZE(packed);
    if (width != 4 && width != 16) {
        PyErr_Format(PyExc_ValueError, "a network address is 4 or 16 bytes, not %zd",
                     width);
        return -1;
    }
    if (!PyLong_Check(prefixlen) || PyBool_Check(prefixlen)) {
        PyErr_Format(PyExc_TypeError, "a prefix length is an int, not %.100s",
                     Py_TYPE(prefixlen)->tp_name);
        return -1;
    }
    bits = PyLong_AsLongAndOverflow(prefixlen, &overflow);
    if (overflow || bits < 0 || bits > 8 * width) {
        PyErr_Format(PyExc_ValueError, "a prefix length of a %zd-byte address is 0-%zd",
                     width, 8 * width);
        return -1;
    }
    bytes = (const unsigned char *)PyBytes_AS_STRING(packed);
    *code = width == 4 ? (int)bits : BLOCK_V6 + (int)bits;
    key = address_key(bytes, (int)width);   /* IPv4 in lo; IPv6 hi, lo */
    *hi = key.hi;
    *lo = key.lo;
    host_hi = *hi;
    host_lo = *lo;
    network_of(*code, hi, lo);
    if (host_hi != *hi || host_lo != *lo) {
        PyErr_Format(PyExc_ValueError, "host bits set past the /%ld", bits);
        return -1;
    }
    return 0;
}


/* The verdict (borrowed) of the entry on the /prefixlen covering an address (its
 * halves), or NULL. */
static inline PyObject *
block_find(const BlockTable *t, int v6, uint64_t hi, uint64_t lo, int prefixlen)
{
    int code = v6 ? BLOCK_V6 + prefixlen : prefixlen;
    int64_t i;
    network_of(code, &hi, &lo);
    if ((i = sub_find(&t->sub[code], code, hi, lo)) < 0)
        return NULL;
    return t->verdicts[sub_id(&t->sub[code], code, (uint64_t)i)].object;
}

/* Does the table hold an IPv6 entry? */
static int
block_covers_v6(PyObject *table)
{
    const uint64_t *bits = ((BlockTable *)table)->used[1];
    return (bits[0] | bits[1] | bits[2]) != 0;
}

/* Name the op the pending error is about: "ops[3]: host bits set past the /24". */
static void
name_op(Py_ssize_t index)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (type != NULL)
        PyErr_Format(type, "ops[%zd]: %S", index, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* One op of apply(), checked. */
typedef struct {
    uint64_t hi, lo;
    PyObject *verdict;     /* borrowed from the op; NULL: delete */
    PyObject *released;    /* a verdict reference the write let go, released after the batch */
    int code;
} BlockOp;

/* A set of object addresses (the verdicts new to the table in one batch). */
typedef struct {
    PyObject **slots;
    uint64_t mask, count;
} PointerSet;

/* Add object (if absent): 1 added, 0 there, -1 out of memory. */
static int
pointer_set_add(PointerSet *set, PyObject *object)
{
    uint64_t i;
    if ((set->count + 1) * 2 > set->mask + 1) {
        uint64_t capacity = set->slots == NULL ? 16 : (set->mask + 1) * 2, j;
        PyObject **fresh = PyMem_RawCalloc(capacity, sizeof(PyObject *));
        if (fresh == NULL)
            return -1;
        for (j = 0; set->slots != NULL && j <= set->mask; j++)
            if (set->slots[j] != NULL) {
                for (i = verdict_hash(set->slots[j]) & (capacity - 1); fresh[i] != NULL;
                     i = (i + 1) & (capacity - 1))
                    ;
                fresh[i] = set->slots[j];
            }
        PyMem_RawFree(set->slots);
        set->slots = fresh;
        set->mask = capacity - 1;
    }
    for (i = verdict_hash(object) & set->mask; set->slots[i] != NULL; i = (i + 1) & set->mask)
        if (set->slots[i] == object)
            return 0;
    set->slots[i] = object;
    set->count++;
    return 1;
}

/* apply() step 2: every allocation the ops could need, made before anything
 * changes: the slots of every sub-table as if every put of a network absent
 * now added one (a bound: duplicates count twice), and room for every verdict
 * new to the table. Then the sub-tables move into their new slots and the
 * verdict index into its new array, which changes no lookup. -1: MemoryError,
 * nothing changed. */
static int
block_reserve(BlockTable *t, const BlockOp *ops, Py_ssize_t n)
{
    uint64_t need[BLOCK_CODES], added = 0, fresh_mask[BLOCK_CODES], want, room;
    void *fresh[BLOCK_CODES];
    uint32_t *vindex = NULL;
    uint64_t vcapacity = 0;
    PointerSet new_verdicts = {NULL, 0, 0};
    PyObject *last = NULL;
    Py_ssize_t k;
    int code;
    memset(need, 0, sizeof need);
    memset(fresh_mask, 0, sizeof fresh_mask);
    memset(fresh, 0, sizeof fresh);
    for (k = 0; k < n; k++) {
        const BlockOp *op = &ops[k];
        if (op->verdict == NULL)
            continue;
        if (sub_find(&t->sub[op->code], op->code, op->hi, op->lo) < 0) {
            need[op->code]++;
            added++;
        }
        if (op->verdict != last) {   /* (ops of one import share a verdict: skip the set) */
            last = op->verdict;
            if (verdict_id(t, last) == 0 && pointer_set_add(&new_verdicts, last) < 0)
                goto no_memory;
        }
    }
    if ((uint64_t)t->count + added > BLOCK_MAX_ENTRIES
            || (uint64_t)t->n_verdicts + new_verdicts.count > BLOCK_MAX_VERDICTS) {
        PyMem_RawFree(new_verdicts.slots);
        PyErr_SetString(PyExc_MemoryError, "a BlockTable holds at most 2**32 - 2 entries "
                                           "and 2**30 verdicts");
        return -1;
    }
    for (code = 0; code < BLOCK_CODES; code++) {
        BlockSub *s = &t->sub[code];
        if (need[code] == 0)
            continue;
        want = sub_capacity_for(code, s->count + need[code]);
        if (s->slots != NULL && want <= (uint64_t)s->mask + 1)
            continue;
        if (want > BLOCK_MAX_CAPACITY)
            goto no_memory;
        if ((fresh[code] = PyMem_RawCalloc(want, slot_size(code))) == NULL)
            goto no_memory;
        fresh_mask[code] = want - 1;
    }
    if (new_verdicts.count != 0) {
        uint64_t verdicts = (uint64_t)t->n_verdicts + new_verdicts.count;
        vcapacity = capacity_for(verdicts);
        if (t->vindex != NULL && vcapacity <= (uint64_t)t->vmask + 1)
            vcapacity = 0;
        else if ((vindex = PyMem_RawCalloc(vcapacity, sizeof(uint32_t))) == NULL)
            goto no_memory;
        /* Ids come from the free list first, then from top: at most 1 + verdicts. */
        room = verdicts + 1 > t->top ? verdicts + 1 : t->top;
        if (room > t->room) {
            uint64_t grown = t->room * 2 > room ? t->room * 2 : room;
            Verdict *array;
            if (grown < 8)
                grown = 8;
            /* Last: once it succeeds nothing can fail (a bigger array changes nothing). */
            array = PyMem_RawRealloc(t->verdicts, grown * sizeof(Verdict));
            if (array == NULL)
                goto no_memory;
            memset(array + t->room, 0, (grown - t->room) * sizeof(Verdict));
            t->verdicts = array;
            t->room = (uint32_t)grown;
        }
    }
    PyMem_RawFree(new_verdicts.slots);
    for (code = 0; code < BLOCK_CODES; code++)
        if (fresh[code] != NULL)
            sub_rehash(t, &t->sub[code], code, fresh[code], (uint32_t)fresh_mask[code], 0);
    if (vindex != NULL) {
        uint32_t id;
        PyMem_RawFree(t->vindex);
        t->vindex = vindex;
        t->vmask = (uint32_t)(vcapacity - 1);
        for (id = 1; id < t->top; id++)
            if (t->verdicts[id].object != NULL)
                vindex_place(t, id);
    }
    return 0;
no_memory:
    for (code = 0; code < BLOCK_CODES; code++)
        PyMem_RawFree(fresh[code]);
    PyMem_RawFree(vindex);
    PyMem_RawFree(new_verdicts.slots);
    PyErr_NoMemory();
    return -1;
}

/* apply() step 3: one op, on room block_reserve made. Cannot fail. */
static void
block_write(BlockTable *t, BlockOp *op)
{
    BlockSub *s = &t->sub[op->code];
    int64_t i = sub_find(s, op->code, op->hi, op->lo);
    uint32_t old = i >= 0 ? sub_id(s, op->code, (uint64_t)i) : 0, id;
    if (op->verdict == NULL) {
        if (i < 0)
            return;
        sub_remove(s, op->code, (uint64_t)i);
        t->count--;
        op->released = verdict_unuse(t, old);
        return;
    }
    if ((id = verdict_id(t, op->verdict)) == 0)
        id = verdict_add(t, op->verdict);
    if (id == old)
        return;
    t->verdicts[id].uses++;
    if (i >= 0) {
        sub_set_id(s, op->code, (uint64_t)i, id);
        op->released = verdict_unuse(t, old);
        return;
    }
    sub_place(s, op->code, op->hi, op->lo, id);
    t->count++;
    bit_set(t->used[op->code >= BLOCK_V6],
            op->code < BLOCK_V6 ? op->code : op->code - BLOCK_V6);
}

static PyObject *
BlockTable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    BlockTable *t;
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "BlockTable() takes no arguments");
        return NULL;
    }
    t = (BlockTable *)type->tp_alloc(type, 0);   /* (zeroed) */
    if (t == NULL)
        return NULL;
    t->top = 1;
    return (PyObject *)t;
}

static void
BlockTable_dealloc(BlockTable *t)
{
    Verdict *verdicts = t->verdicts;
    uint32_t id, top = t->top;
    int code;
    size_t r;
    for (code = 0; code < BLOCK_CODES; code++)
        PyMem_RawFree(t->sub[code].slots);
    for (r = 0; r < t->n_retired; r++)
        PyMem_RawFree(t->retired[r].memory);
    PyMem_RawFree(t->retired);
    PyMem_RawFree(t->vindex);
    t->verdicts = NULL;
    for (id = 1; verdicts != NULL && id < top; id++)
        Py_XDECREF(verdicts[id].object);
    PyMem_RawFree(verdicts);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t
BlockTable_length(BlockTable *t)
{
    return t->count;
}

static PyObject *
BlockTable_apply(BlockTable *t, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "apply() takes a sequence of (packed, prefixlen, "
                                         "verdict)"), **items;
    BlockOp *ops = NULL;
    Py_ssize_t n, k;
    uint64_t touched[3] = {0, 0, 0};
    int code;
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    if (n > 0 && (ops = PyMem_Calloc((size_t)n, sizeof(BlockOp))) == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    /* 1. Check every op: no Python code runs from here to step 4, so the
     * borrowed verdicts stay as they are. */
    for (k = 0; k < n; k++) {
        PyObject *item = items[k], *verdict;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_Format(PyExc_TypeError, "ops[%zd]: an op is a (packed, prefixlen, verdict) "
                         "tuple, not %.100s", k, Py_TYPE(item)->tp_name);
            goto fail;
        }
        if (block_network(PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1), &ops[k].code,
                          &ops[k].hi, &ops[k].lo) < 0) {
            name_op(k);
            goto fail;
        }
        verdict = PyTuple_GET_ITEM(item, 2);
        ops[k].verdict = verdict == Py_None ? NULL : verdict;
    }
    /* 2. Every allocation the writes could need. */
    if (n > 0 && block_reserve(t, ops, n) < 0)
        goto fail;
    /* 3. The writes, in order (a later op on the same network wins). */
    for (k = 0; k < n; k++) {
        block_write(t, &ops[k]);
        bit_set(touched, ops[k].code);
    }
    for (k = 0; k < 3; k++)
        touched[k] |= t->loose[k];
    for (code = longest_below(touched, BLOCK_CODES); code >= 0;
         code = longest_below(touched, code))
        sub_tidy(t, code);
    verdicts_tidy(t);
    t->version++;
    /* 4. The references let go, now that the table is whole (finalisers may run). */
    for (k = 0; k < n; k++)
        Py_XDECREF(ops[k].released);
    PyMem_Free(ops);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    PyMem_Free(ops);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
BlockTable_get(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t hi, lo;
    int code;
    int64_t i;
    PyObject *verdict = Py_None;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get(packed, prefixlen)");
        return NULL;
    }
    if (block_network(args[0], args[1], &code, &hi, &lo) < 0)
        return NULL;
    if ((i = sub_find(&t->sub[code], code, hi, lo)) >= 0)
        verdict = t->verdicts[sub_id(&t->sub[code], code, (uint64_t)i)].object;
    Py_INCREF(verdict);
    return verdict;
}

static PyObject *
BlockTable_lengths(BlockTable *t, PyObject *arg)
{
    long width = PyLong_Check(arg) ? PyLong_AsLong(arg) : -1;
    uint64_t bits[3];
    PyObject *lengths;
    Py_ssize_t n = 0;
    int p;
    if (width != 4 && width != 16) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "lengths(width): width is 4 or 16");
        }
        return NULL;
    }
    memcpy(bits, t->used[width == 16], sizeof bits);
    for (p = longest_below(bits, 129); p >= 0; p = longest_below(bits, p))
        n++;
    if ((lengths = PyTuple_New(n)) == NULL)
        return NULL;
    n = 0;
    for (p = longest_below(bits, 129); p >= 0; p = longest_below(bits, p)) {
        PyObject *length = PyLong_FromLong(p);
        if (length == NULL) {
            Py_DECREF(lengths);
            return NULL;
        }
        PyTuple_SET_ITEM(lengths, n++, length);
    }
    return lengths;
}

static void
changed_while_read(void)
{
    PyErr_SetString(PyExc_RuntimeError, "BlockTable changed while it was read");
}

/* items(): every entry. Making the tuples may run the cyclic GC and with it
 * finalisers that could change the table: the version says. */
static PyObject *
BlockTable_items(BlockTable *t, PyObject *unused)
{
    uint64_t version = t->version, i, hi, lo;
    PyObject *list = PyList_New(t->count);
    Py_ssize_t n = 0;
    int code;
    (void)unused;
    if (list == NULL)
        return NULL;
    if (t->version != version)
        goto changed;
    for (code = 0; code < BLOCK_CODES; code++) {
        BlockSub *s = &t->sub[code];
        for (i = 0; s->slots != NULL && i <= s->mask; i++) {
            uint32_t id = sub_id(s, code, i);
            PyObject *packed, *prefixlen, *item;
            Key network;
            if (id == 0)
                continue;
            sub_key(s, code, i, &hi, &lo);
            network.hi = hi;
            network.lo = lo;
            network.length = code < BLOCK_V6 ? 4 : 16;
            packed = key_bytes(network);
            prefixlen = PyLong_FromLong(code < BLOCK_V6 ? code : code - BLOCK_V6);
            item = packed != NULL && prefixlen != NULL ? PyTuple_New(3) : NULL;
            if (item == NULL) {
                Py_XDECREF(packed);
                Py_XDECREF(prefixlen);
                Py_DECREF(list);
                return NULL;
            }
            PyTuple_SET_ITEM(item, 0, packed);
            PyTuple_SET_ITEM(item, 1, prefixlen);
            if (t->version != version) {
                Py_INCREF(Py_None);
                PyTuple_SET_ITEM(item, 2, Py_None);
                Py_DECREF(item);
                goto changed;
            }
            Py_INCREF(t->verdicts[id].object);
            PyTuple_SET_ITEM(item, 2, t->verdicts[id].object);
            PyList_SET_ITEM(list, n++, item);
        }
    }
    return list;
changed:
    Py_DECREF(list);
    changed_while_read();
    return NULL;
}

/* verdicts(): (verdict, uses) for every verdict held. */
static PyObject *
BlockTable_verdicts(BlockTable *t, PyObject *unused)
{
    uint64_t version = t->version;
    PyObject *list = PyList_New(t->n_verdicts);
    Py_ssize_t n = 0;
    uint32_t id;
    (void)unused;
    if (list == NULL)
        return NULL;
    for (id = 1; id < t->top; id++) {
        PyObject *uses, *item;
        if (t->version != version)
            goto changed;
        if (t->verdicts[id].object == NULL)
            continue;
        uses = PyLong_FromUnsignedLong(t->verdicts[id].uses);
        item = uses != NULL ? PyTuple_New(2) : NULL;
        if (item == NULL) {
            Py_XDECREF(uses);
            Py_DECREF(list);
            return NULL;
        }
        PyTuple_SET_ITEM(item, 1, uses);
        if (t->version != version) {
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(item, 0, Py_None);
            Py_DECREF(item);
            goto changed;
        }
        Py_INCREF(t->verdicts[id].object);
        PyTuple_SET_ITEM(item, 0, t->verdicts[id].object);
        PyList_SET_ITEM(list, n++, item);
    }
    if (t->version != version)
        goto changed;
    return list;
changed:
    Py_DECREF(list);
    changed_while_read();
    return NULL;
}

/*
 * purge(verdicts, start, max_slots) -> (removed, next): remove the entries of
 * these verdicts met in at most max_slots slots from cursor start. Every slot
 * looked at counts, those a removal's backward shift examines too; a shift is
 * not cut short, so a call may go past max_slots by a probe run. A cursor is
 * 1 + (code << 32 | slot), 0 the start; next is 0 once the pass reached the end.
 * A cursor taken before the table changed is still safe: past a sub-table's end
 * (it shrank) the pass goes on with the next. A sub-table the pass leaves empty
 * is freed; one it leaves under 1/8 full is shrunk if that costs no more than
 * the slots left in the call, else by the next apply().
 */
static PyObject *
BlockTable_purge(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *seq, **objects;
    unsigned long long start;
    long long cursor;
    int overflow = 0;
    Py_ssize_t max_slots, removed = 0, k, n, marked = 0;
    int64_t budget;
    uint64_t slot, next = 0;
    uint32_t only = 0;
    int code;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "purge(verdicts, start, max_slots)");
        return NULL;
    }
    if (!PyLong_Check(args[1]) || !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "purge(): start and max_slots are ints");
        return NULL;
    }
    cursor = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (overflow < 0 || (overflow == 0 && cursor < 0)) {
        PyErr_SetString(PyExc_ValueError, "purge(): a cursor is an int >= 0");
        return NULL;
    }
    /* (a cursor far past the end: the pass is over) */
    start = overflow > 0 ? (unsigned long long)BLOCK_CODES << 32 : (unsigned long long)cursor;
    max_slots = PyLong_AsSsize_t(args[2]);
    if (max_slots < 1) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "purge(): max_slots must be 1 to 2**63 - 1");
        }
        return NULL;
    }
    if ((seq = PySequence_Fast(args[0], "purge() takes an iterable of verdicts")) == NULL)
        return NULL;
    /* seq holds a reference to each verdict: a use count reaching 0 below lets
     * the table's reference go at once, and the object outlives the walk. */
    n = PySequence_Fast_GET_SIZE(seq);
    objects = PySequence_Fast_ITEMS(seq);
    for (k = 0; k < n; k++) {
        uint32_t id = verdict_id(t, objects[k]);
        if (id != 0 && !t->verdicts[id].marked) {
            t->verdicts[id].marked = 1;
            marked++;
            only = id;
        }
    }
    if (marked == 0) {
        Py_DECREF(seq);
        return Py_BuildValue("(nK)", (Py_ssize_t)0, 0ULL);
    }
    if (start == 0)
        code = 0, slot = 0;
    else if ((start - 1) >> 32 >= BLOCK_CODES)
        code = BLOCK_CODES, slot = 0;
    else
        code = (int)((start - 1) >> 32), slot = (start - 1) & UINT32_MAX;
    budget = max_slots;
    while (code < BLOCK_CODES) {
        BlockSub *s = &t->sub[code];
        uint64_t end, i;
        uint32_t id;
        int whole;
        if (s->slots != NULL && s->count == 0)
            sub_free(t, code);
        if (s->slots == NULL || slot > s->mask) {
            /* The pass leaves this sub-table. */
            if (s->slots != NULL && bit_test(t->loose, code)) {
                uint64_t capacity = (uint64_t)s->mask + 1;
                if ((int64_t)capacity <= budget) {
                    budget -= (int64_t)capacity;
                    sub_tidy(t, code);
                }
            }
            code++;
            slot = 0;
            continue;
        }
        if (budget <= 0)
            break;
        end = (uint64_t)s->mask + 1;
        if (end - slot > (uint64_t)budget)
            end = slot + (uint64_t)budget;
        end = sub_scan(s, code, t->verdicts, marked == 1 ? only : 0, slot, end);
        budget -= (int64_t)(end - slot);
        slot = end;
        if (slot > s->mask || budget <= 0)
            continue;
        /* A marked entry: take its run (to the next empty slot, within the budget
         * and the array) and remove the marked entries in it from the back, where a
         * removal with an empty slot after it shifts nothing and hashes nothing. A
         * run cut short by the budget is begun again by the next call (a shift may
         * have pulled a marked entry in from past its end). */
        end = slot + 1;
        while (end <= s->mask && (int64_t)(end - slot) < budget && sub_id(s, code, end) != 0)
            end++;
        whole = end > s->mask || sub_id(s, code, end) == 0;
        budget -= (int64_t)(end - slot);
        for (i = end; i-- > slot;) {
            id = sub_id(s, code, i);
            if (id == 0 || !t->verdicts[id].marked)
                continue;
            budget -= (int64_t)sub_remove(s, code, i);
            t->count--;
            removed++;
            if (--t->verdicts[id].uses == 0)
                Py_DECREF(verdict_drop(t, id));   /* (not the last reference: seq holds one) */
        }
        if (whole)
            slot = end;   /* (else the run was cut short: slot stays) */
        if (s->count * 8 < (uint64_t)s->mask + 1 && s->mask + 1 > BLOCK_MIN_CAPACITY)
            bit_set(t->loose, code);
    }
    if (code < BLOCK_CODES)
        next = 1 + ((uint64_t)code << 32 | slot);
    for (k = 0; k < n; k++) {
        uint32_t id = verdict_id(t, objects[k]);
        if (id != 0)
            t->verdicts[id].marked = 0;
    }
    verdicts_tidy(t);
    t->version++;   /* (a sub-table may have been freed or shrunk without a removal) */
    Py_DECREF(seq);
    return Py_BuildValue("(nK)", removed, (unsigned long long)next);
}

/* release(max_bytes): give back to the kernel at most max_bytes of retired
 * slots (their pages dropped with madvise, then the array freed once all
 * are); the bytes still waiting. */
static PyObject *
BlockTable_release(BlockTable *t, PyObject *arg)
{
    Py_ssize_t budget = PyLong_AsSsize_t(arg);
    size_t waiting = 0, r;
    if (budget < 1) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "release(): max_bytes must be 1 to 2**63 - 1");
        }
        return NULL;
    }
    while (t->n_retired > 0 && budget > 0) {
        Retired *last = &t->retired[t->n_retired - 1];
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t slice = last->end - last->next;
        if (slice > (uintptr_t)budget)   /* whole pages, at least one */
            slice = ((uintptr_t)budget + page - 1) & ~(page - 1);
        if (slice > 0)
            (void)madvise((void *)last->next, slice, MADV_DONTNEED);
        last->next += slice;
        budget -= (Py_ssize_t)slice;
        if (last->next >= last->end) {   /* (its pages are gone: free() unmaps little) */
            PyMem_RawFree(last->memory);
            t->n_retired--;
        }
    }
    for (r = 0; r < t->n_retired; r++)
        waiting += t->retired[r].end - t->retired[r].next;
    return PyLong_FromSize_t(waiting);
}

static PyMethodDef BlockTable_methods[] = {
    {"release", (PyCFunction)BlockTable_release, METH_O,
     "release(max_bytes) -> bytes: give back at most max_bytes of the memory emptied "
     "sub-tables held; the bytes still waiting"},
    {"apply", (PyCFunction)BlockTable_apply, METH_O,
     "apply(ops): ops a sequence of (packed, prefixlen, verdict), verdict None to delete "
     "the network; in order, all or nothing (TypeError, ValueError, MemoryError: no change)"},
    {"get", (PyCFunction)(void (*)(void))BlockTable_get, METH_FASTCALL,
     "get(packed, prefixlen) -> the verdict on that network, else None"},
    {"lengths", (PyCFunction)BlockTable_lengths, METH_O,
     "lengths(width) -> the prefix lengths in use for width 4 or 16, longest first"},
    {"items", (PyCFunction)BlockTable_items, METH_NOARGS,
     "items() -> [(packed, prefixlen, verdict)], in no particular order"},
    {"verdicts", (PyCFunction)BlockTable_verdicts, METH_NOARGS,
     "verdicts() -> [(verdict, uses)] for every distinct verdict held"},
    {"purge", (PyCFunction)(void (*)(void))BlockTable_purge, METH_FASTCALL,
     "purge(verdicts, start, max_slots) -> (removed, next): remove the entries of these "
     "verdicts among at most max_slots slots from cursor start (0: the beginning); "
     "next is 0 at the end of the pass, else the cursor to go on from"},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods BlockTable_as_mapping = {
    .mp_length = (lenfunc)BlockTable_length,
};

static PyTypeObject BlockTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.BlockTable",
    .tp_basicsize = sizeof(BlockTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BlockTable(): the blocklist layer, network (packed, prefixlen) -> verdict, "
              "a slot per entry (see guardntp/_fastlane.c)",
    .tp_new = BlockTable_new,
    .tp_dealloc = (destructor)BlockTable_dealloc,
    .tp_methods = BlockTable_methods,
    .tp_as_mapping = &BlockTable_as_mapping,
};

/* ------------------------------------------------------------------ NewcomerRing */

/*
 * First sightings once the source table is full (filter/buckets.py,
 * NewcomerTable): key -> TAT, forgotten first-in first-out. The same rules as
 * the dict and list it replaces: a ring of max_entries keys bounds a hash of
 * key -> TAT; writing a ring slot forgets the key that was there if it is
 * still remembered (an eviction); a key forgotten meanwhile (promoted) leaves
 * its old slot behind, so a key re-added after promotion may be forgotten
 * early, which only costs it its newcomer history.
 *
 * Keys are the source table's (an AddressTable Key: an IPv4 address, an IPv6
 * source prefix of up to /128, 1-16 bytes), kept in the slots themselves, hashed
 * as the table hashes them: no object per entry. A hash slot is 32 bytes
 * and a ring slot 24, about 90 bytes an entry at the table's load (the dict,
 * its bytes keys, int TATs and the list cost ~130). Linear probing at most
 * half full, keyed with the process's random seed, deletion by backward shift.
 * Memory from PyMem_Raw*: tracemalloc (contrib/sizing/measure.py) counts it,
 * and calloc leaves an unused ring's pages untouched.
 */
typedef struct {
    uint64_t hi, lo;
    uint32_t length;       /* 0 in an empty slot */
    uint32_t pos;          /* the ring slot this key was last written to */
    int64_t tat;
} RingSlot;

typedef struct {
    PyObject_HEAD
    RingSlot *slots;
    uint64_t mask;
    Py_ssize_t count;
    Key *ring;             /* max_entries slots; length 0: never written */
    Py_ssize_t max_entries, next;
    int64_t evictions;
} NewcomerRing;

static PyTypeObject NewcomerRingType;

#define RING_MAX_KEY 16
#define RING_PRESIZED (1u << 21)   /* 64 MiB of slots; a larger ring grows past it */

/* The key of a bytes object; length 0 when it is not a source key (1-16 bytes). */
static Key
ring_key_of(PyObject *object)
{
    Key key = key_of(object);
    if (key.length > RING_MAX_KEY)
        key.length = 0;
    return key;
}

static inline int
ring_slot_is(const RingSlot *s, Key key)
{
    return s->hi == key.hi && s->lo == key.lo && s->length == key.length;
}

static inline RingSlot *
ring_find(NewcomerRing *nr, Key key)
{
    uint64_t i = index_hash(key) & nr->mask;
    for (;;) {
        RingSlot *s = &nr->slots[i];
        if (ring_slot_is(s, key))
            return s;
        if (s->length == 0)
            return NULL;
        i = (i + 1) & nr->mask;
    }
}

static int
ring_grow(NewcomerRing *nr)
{
    uint64_t capacity = (nr->mask + 1) * 2, i;
    RingSlot *old = nr->slots, *fresh = PyMem_RawCalloc(capacity, sizeof(RingSlot));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i <= nr->mask; i++)
        if (old[i].length != 0) {
            Key key = {old[i].hi, old[i].lo, old[i].length};
            uint64_t j = index_hash(key) & (capacity - 1);
            while (fresh[j].length != 0)
                j = (j + 1) & (capacity - 1);
            fresh[j] = old[i];
        }
    nr->slots = fresh;
    nr->mask = capacity - 1;
    PyMem_RawFree(old);
    return 0;
}

/* Add key (absent) with its TAT and ring slot. */
static int
ring_add(NewcomerRing *nr, Key key, int64_t tat, uint32_t pos)
{
    uint64_t i;
    RingSlot *s;
    if ((uint64_t)(nr->count + 1) * 2 > nr->mask + 1 && ring_grow(nr) < 0)
        return -1;
    i = index_hash(key) & nr->mask;
    while (nr->slots[i].length != 0)
        i = (i + 1) & nr->mask;
    s = &nr->slots[i];
    s->hi = key.hi;
    s->lo = key.lo;
    s->length = key.length;
    s->pos = pos;
    s->tat = tat;
    nr->count++;
    return 0;
}

/* Forget key; 1 (and *tat) if it was remembered, else 0. */
static int
ring_pop(NewcomerRing *nr, Key key, int64_t *tat)
{
    uint64_t i = index_hash(key) & nr->mask, j;
    while (!ring_slot_is(&nr->slots[i], key)) {
        if (nr->slots[i].length == 0)
            return 0;
        i = (i + 1) & nr->mask;
    }
    if (tat != NULL)
        *tat = nr->slots[i].tat;
    j = i;
    for (;;) {   /* backward shift, as table_remove_slot */
        uint64_t home;
        Key moved;
        j = (j + 1) & nr->mask;
        if (nr->slots[j].length == 0)
            break;
        moved.hi = nr->slots[j].hi;
        moved.lo = nr->slots[j].lo;
        moved.length = nr->slots[j].length;
        home = index_hash(moved) & nr->mask;
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        nr->slots[i] = nr->slots[j];
        i = j;
    }
    memset(&nr->slots[i], 0, sizeof(RingSlot));
    nr->count--;
    return 1;
}

/* NewcomerTable.remember: update a remembered key's TAT, else write it to the
 * next ring slot, forgetting (an eviction) the key written there before. */
static int
ring_remember(NewcomerRing *nr, Key key, int64_t tat)
{
    RingSlot *s = ring_find(nr, key);
    Py_ssize_t slot;
    if (s != NULL) {
        s->tat = tat;
        return 0;
    }
    slot = nr->next;
    if (nr->ring[slot].length != 0 && ring_pop(nr, nr->ring[slot], NULL))
        nr->evictions++;
    if (ring_add(nr, key, tat, (uint32_t)slot) < 0)
        return -1;
    nr->ring[slot] = key;
    nr->next = slot + 1 < nr->max_entries ? slot + 1 : 0;
    return 0;
}

static PyObject *
NewcomerRing_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"max_entries", NULL};
    Py_ssize_t max_entries;
    uint64_t capacity = TABLE_MIN_CAPACITY;
    NewcomerRing *nr;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n:NewcomerRing", names, &max_entries))
        return NULL;
    if (max_entries < 1 || (uint64_t)max_entries > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a table needs room for at least one entry "
                        "(and at most 2**32 - 1)");
        return NULL;
    }
    nr = (NewcomerRing *)type->tp_alloc(type, 0);
    if (nr == NULL)
        return NULL;
    /* The hash at the size a full ring needs (up to RING_PRESIZED slots), so that a
     * flood does not stall the loop with rehashes of a growing table; calloc's
     * pages stay untouched until newcomers arrive (once the source table is full). */
    while (capacity < RING_PRESIZED && (uint64_t)max_entries * 2 > capacity)
        capacity *= 2;
    nr->slots = PyMem_RawCalloc(capacity, sizeof(RingSlot));
    nr->ring = PyMem_RawCalloc((size_t)max_entries, sizeof(Key));
    if (nr->slots == NULL || nr->ring == NULL) {
        Py_DECREF(nr);
        return PyErr_NoMemory();
    }
    nr->mask = capacity - 1;
    nr->max_entries = max_entries;
    return (PyObject *)nr;
}

static void
NewcomerRing_dealloc(NewcomerRing *nr)
{
    PyMem_RawFree(nr->slots);
    PyMem_RawFree(nr->ring);
    Py_TYPE(nr)->tp_free((PyObject *)nr);
}

static Py_ssize_t
NewcomerRing_length(NewcomerRing *nr)
{
    return nr->count;
}

static int
NewcomerRing_contains(NewcomerRing *nr, PyObject *key)
{
    Key k = ring_key_of(key);
    return k.length != 0 && ring_find(nr, k) != NULL;
}

static PyObject *
NewcomerRing_subscript(NewcomerRing *nr, PyObject *key)
{
    Key k = ring_key_of(key);
    RingSlot *s = k.length != 0 ? ring_find(nr, k) : NULL;
    if (s == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromLongLong(s->tat);
}

static PyObject *
NewcomerRing_remember(NewcomerRing *nr, PyObject *args)
{
    PyObject *key, *tat_obj;
    Key k;
    int64_t tat;
    if (!PyArg_ParseTuple(args, "OO:remember", &key, &tat_obj))
        return NULL;
    k = ring_key_of(key);
    if (k.length == 0) {
        PyErr_SetString(PyExc_ValueError, "a newcomer's key is 1-16 bytes");
        return NULL;
    }
    if (!as_i64(tat_obj, &tat)) {
        PyErr_SetString(PyExc_TypeError, "a TAT is an int that fits 64 bits");
        return NULL;
    }
    if (ring_remember(nr, k, tat) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
NewcomerRing_get(NewcomerRing *nr, PyObject *args)
{
    PyObject *key, *fallback = Py_None;
    Key k;
    RingSlot *s;
    if (!PyArg_ParseTuple(args, "O|O:get", &key, &fallback))
        return NULL;
    k = ring_key_of(key);
    s = k.length != 0 ? ring_find(nr, k) : NULL;
    if (s == NULL) {
        Py_INCREF(fallback);
        return fallback;
    }
    return PyLong_FromLongLong(s->tat);
}

static PyObject *
NewcomerRing_discard(NewcomerRing *nr, PyObject *key)
{
    Key k = ring_key_of(key);
    if (k.length != 0 && ring_pop(nr, k, NULL))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* items() -> [(key, tat)], oldest first: the order a dict would keep them in
 * (each key at the ring slot it was last written to). */
static PyObject *
NewcomerRing_items(NewcomerRing *nr, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    Py_ssize_t n;
    (void)unused;
    if (list == NULL)
        return NULL;
    for (n = 0; n < nr->max_entries; n++) {
        Py_ssize_t slot = (nr->next + n) % nr->max_entries;
        Key key = nr->ring[slot];
        RingSlot *s;
        PyObject *pair, *bytes;
        int rc;
        if (key.length == 0 || (s = ring_find(nr, key)) == NULL || s->pos != (uint32_t)slot)
            continue;
        bytes = key_bytes(key);
        pair = bytes == NULL ? NULL : Py_BuildValue("(NL)", bytes, (long long)s->tat);
        rc = pair == NULL ? -1 : PyList_Append(list, pair);
        Py_XDECREF(pair);
        if (rc < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

static PyObject *
NewcomerRing_get_max_entries(NewcomerRing *nr, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(nr->max_entries);
}

static PyObject *
NewcomerRing_get_evictions(NewcomerRing *nr, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(nr->evictions);
}

static int
NewcomerRing_set_evictions(NewcomerRing *nr, PyObject *value, void *closure)
{
    int64_t v;
    (void)closure;
    if (value == NULL || !as_i64(value, &v)) {
        PyErr_SetString(PyExc_TypeError, "evictions is an int");
        return -1;
    }
    nr->evictions = v;
    return 0;
}

static PyMethodDef NewcomerRing_methods[] = {
    {"remember", (PyCFunction)NewcomerRing_remember, METH_VARARGS,
     "remember(key, tat): as NewcomerTable.remember"},
    {"get", (PyCFunction)NewcomerRing_get, METH_VARARGS,
     "get(key, default=None) -> the remembered TAT or default"},
    {"discard", (PyCFunction)NewcomerRing_discard, METH_O,
     "discard(key) -> bool: forget key (its ring slot stays behind)"},
    {"items", (PyCFunction)NewcomerRing_items, METH_NOARGS,
     "items() -> [(key, tat)], oldest first"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NewcomerRing_getset[] = {
    {"max_entries", (getter)NewcomerRing_get_max_entries, NULL, "ring slots", NULL},
    {"evictions", (getter)NewcomerRing_get_evictions, (setter)NewcomerRing_set_evictions,
     "keys forgotten because their ring slot was written again", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods NewcomerRing_as_sequence = {
    .sq_contains = (objobjproc)NewcomerRing_contains,
};

static PyMappingMethods NewcomerRing_as_mapping = {
    .mp_length = (lenfunc)NewcomerRing_length,
    .mp_subscript = (binaryfunc)NewcomerRing_subscript,
};

static PyTypeObject NewcomerRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.NewcomerRing",
    .tp_basicsize = sizeof(NewcomerRing),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NewcomerRing(max_entries): first sightings, key -> TAT, forgotten first-in "
              "first-out (filter/buckets.py, NewcomerTable)",
    .tp_new = NewcomerRing_new,
    .tp_dealloc = (destructor)NewcomerRing_dealloc,
    .tp_methods = NewcomerRing_methods,
    .tp_getset = NewcomerRing_getset,
    .tp_as_sequence = &NewcomerRing_as_sequence,
    .tp_as_mapping = &NewcomerRing_as_mapping,
};

static inline int
record_int(Record *r, int i, int64_t *out)
{
    if (IS_OBJECT(r, i))
        return 0;
    *out = r->cell[i].n;
    return 1;
}


/* ------------------------------------------------------------------ the decision */

/* What fast_decide left in its output buffer. */
enum { REPLY_NONE, REPLY_TIME, REPLY_KOD };

/* The sanity stage's verdict on a request's first byte: its drop reason, or -1
 * (NTPv1 mode 0 is dropped from the NTP port only). */
static inline int
first_byte_drop(Lane *L, unsigned first, int port)
{
    return port == NTP_PORT ? L->drop_reason_ntp_port[first] : L->drop_reason[first];
}

/* fingerprint.packet_label: by first byte, except NTPv1, by source port. */
static inline int
label_slot(Lane *L, unsigned first, int port)
{
    if (((first >> 3) & 7) != 1)
        return (int)first;
    return port == L->netgear_port ? V1_NETGEAR : V1_OTHER;
}

/*
 * The bound behind every int64 time sum and difference here: now_ns is clamped
 * to [earliest_ns, latest_ns], inside +-TIME_BOUND; "never" lies within
 * 2 * TIME_BOUND behind; an interval or tolerance is at most TIME_BOUND / 2, so
 * a TAT (at most a tolerance and an interval ahead of a now) stays within
 * 2 * TIME_BOUND, and any difference of two such times within 3 * TIME_BOUND,
 * under 2^63. Products (the crowd's repricing, the irregularity test) are
 * computed in 128 bits.
 */
#define TIME_BOUND ((int64_t)1 << 61)

static int
times_fit(Lane *L)
{
    int64_t spans[] = {L->prefix_interval, L->prefix_tolerance, L->global_interval,
                       L->global_tolerance, L->kod_bucket_interval, L->kod_bucket_tolerance,
                       L->kod_interval, L->class_memory_ns, L->crowd_window_ns};
    size_t i;
    if (L->earliest_ns < -TIME_BOUND || L->latest_ns > TIME_BOUND
            || L->earliest_ns > L->latest_ns || L->never < -2 * TIME_BOUND
            || L->never >= L->earliest_ns)
        return 0;
    for (i = 0; i < sizeof(spans) / sizeof(spans[0]); i++)
        if (spans[i] < 0 || spans[i] > TIME_BOUND / 2)
            return 0;
    for (i = 0; i < LABEL_SLOTS; i++)
        if (L->interval[i] < 0 || L->interval[i] > TIME_BOUND / 2 || L->tolerance[i] < 0
                || L->tolerance[i] > TIME_BOUND / 2)
            return 0;
    return 1;
}

/* A record's cell i holds a time within 2 * TIME_BOUND of zero. */
static inline int
record_time(Record *record, int i)
{
    int64_t t;
    return record_int(record, i, &t) && t >= -2 * TIME_BOUND && t <= 2 * TIME_BOUND;
}

/* A table holds only records the filter made, whose cells hold what it writes
 * there. Anything else is a bug elsewhere: an error here (the batch is lost and
 * counted as a decision error), never a decision by other rules. */
static int
foreign_record(const char *table)
{
    PyErr_Format(PyExc_TypeError, "a %s record the filter did not write", table);
    return -1;
}

/* The monotonic clock as Pipeline.decide reads it. */
static inline int64_t
clamped_now(Lane *L, int64_t now_ns)
{
    return now_ns < L->earliest_ns ? L->earliest_ns
           : now_ns > L->latest_ns ? L->latest_ns : now_ns;
}

/* Pipeline.decide's source key: the IPv4 address, or the IPv6 address's first
 * v6_source_bytes (its /64 by default). */
static inline Key
source_key(Lane *L, const unsigned char *packed, int packed_len)
{
    return address_key(packed, packed_len == 4 ? 4 : L->v6_source_bytes);
}

/* reference.prefix_key, as a table key. IPv4: the default /24 is a 3-byte
 * slice, any other length the address shifted right, as 4 bytes. IPv6: b"6"
 * and the prefix's bytes (the default /56: 7), or for a prefix that is not
 * whole bytes (or /128) b"6" and the 16 bytes of the address shifted right. */
static inline Key
prefix_key(Lane *L, const unsigned char *packed, int packed_len)
{
    uint32_t a;
    unsigned char masked[4];
    if (packed_len == 16) {
        int bits = L->v6_prefix_bits;
        Key key;
        if (bits % 8 == 0 && bits < 128) {
            unsigned char tagged[16];
            tagged[0] = V6_TAG;
            memcpy(tagged + 1, packed, (size_t)(bits / 8));
            return address_key(tagged, bits / 8 + 1);
        }
        key = address_key(packed, 16);
        if (bits < 128) {
            unsigned __int128 v = ((unsigned __int128)key.hi << 64 | key.lo) >> (128 - bits);
            key.hi = (uint64_t)(v >> 64);
            key.lo = (uint64_t)v;
        }
        key.length = MAX_KEY;
        return key;
    }
    if (L->v4_prefix_bits % 8 == 0)
        return address_key(packed, L->v4_prefix_bits / 8);
    a = ((uint32_t)packed[0] << 24) | ((uint32_t)packed[1] << 16)
        | ((uint32_t)packed[2] << 8) | packed[3];
    a >>= 32 - L->v4_prefix_bits;
    masked[0] = a >> 24;
    masked[1] = a >> 16;
    masked[2] = a >> 8;
    masked[3] = a;
    return address_key(masked, 4);
}

/* The source's record in the index, if it is one the fast path may use. */
static inline Record *
source_record(Lane *L, const unsigned char *packed, int packed_len)
{
    PyObject *found = table_find(SOURCE_TABLE(L), source_key(L, packed, packed_len));
    if (found == NULL || Py_TYPE(found) != &RecordType || Py_SIZE(found) != RECORD_CELLS)
        return NULL;
    return (Record *)found;
}

/* ReferenceModel._global_allows: take one reply from the global budget if it has one. */
static inline int
global_allows(Lane *L, int64_t now_ns)
{
    int64_t tat;
    if (!L->has_global)
        return 1;
    tat = BUDGET(L, BUDGET_GLOBAL) > now_ns ? BUDGET(L, BUDGET_GLOBAL) : now_ns;
    if (tat - now_ns > L->global_tolerance)
        return 0;
    BUDGET(L, BUDGET_GLOBAL) = tat + L->global_interval;
    return 1;
}

/* Responder.time_reply_at's first 40 bytes (the transmit stamp comes at send time). */
static inline void
time_reply_head(Lane *L, const unsigned char *d, int64_t recv_ns, unsigned char *out)
{
    unsigned first = d[0];
    memcpy(out, L->reply_heads + (((first >> 3) & 7) * 8 + L->reply_mode[first]) * 2, 2);
    out[2] = d[2];
    memcpy(out + 3, L->fields, FIELDS_LEN);
    memcpy(out + 24, d + 40, 8);
    put_ntp(out + 32, (__int128)recv_ns + L->offset_ns);
}

/* Responder.kod_reply(data, request, code, kod_min_poll): 48 bytes. */
static inline void
kod_reply(Lane *L, const unsigned char *d, const char *code, int64_t min_poll,
          unsigned char *out)
{
    unsigned first = d[0];
    int64_t poll = (int64_t)(signed char)d[2];
    if (poll < min_poll)
        poll = min_poll;
    out[0] = (unsigned char)((3u << 6) | (((first >> 3) & 7) << 3) | L->reply_mode[first]);
    out[1] = 0;
    out[2] = (unsigned char)(poll & 0xFF);
    out[3] = L->fields[0];   /* the precision */
    memset(out + 4, 0, 8);
    memcpy(out + 12, code, 4);
    memset(out + 16, 0, 8);
    memcpy(out + 24, d + 40, 8);
    memcpy(out + 32, d + 40, 8);
    memcpy(out + 40, d + 40, 8);
}

static PyObject *str_action, *str_expires_ns, *str_origin;   /* interned at import */
static PyObject *str_evictions, *str_admissions_refused, *str_table_full;
static PyObject *long_zero, *long_one;

static inline void
set_label(Lane *L, Record *record, int slot)
{
    if (record->cell[L->i_label].o != L->labels[slot]) {
        PyObject *old = record->cell[L->i_label].o;
        Py_INCREF(L->labels[slot]);
        record->cell[L->i_label].o = L->labels[slot];
        Py_DECREF(old);
    }
}

/* Pipeline.decide step 3, the access list: what an entry asks for. */
enum { ACL_PASS, ACL_EXEMPT, ACL_DROP, ACL_DENY, NTS_NAK };

/*
 * The verdict of access-list entry (None, or an AclEntry the list returned):
 * *kind, and for a drop or a deny *why (ACL_DENY for the configuration's
 * entries, BLOCKLISTED for the blocklist's). 1, or 0 to leave the packet to
 * Python (an action this file does not know), -1 on error.
 */
static int
acl_verdict(Lane *L, PyObject *entry, int *kind, int *why)
{
    PyObject *value;
    int config;
    *kind = ACL_PASS;
    *why = 0;
    if (entry == Py_None)
        return 1;
    if ((value = PyObject_GetAttr(entry, str_action)) == NULL)
        return -1;
    *kind = value == L->action_allow ? ACL_PASS : value == L->action_exempt ? ACL_EXEMPT
            : value == L->action_drop ? ACL_DROP : value == L->action_deny ? ACL_DENY : -1;
    Py_DECREF(value);
    if (*kind < 0) {
        PyErr_SetString(PyExc_TypeError, "an access-list entry whose action is not an Action");
        return -1;
    }
    if (*kind == ACL_PASS || *kind == ACL_EXEMPT)
        return 1;
    if ((value = PyObject_GetAttr(entry, str_origin)) == NULL)
        return -1;
    config = PyUnicode_Check(value) && PyUnicode_CompareWithASCIIString(value, "config") == 0;
    Py_DECREF(value);
    *why = config ? L->reason_acl_deny : L->reason_blocklisted;
    return 1;
}

/* AclEntry.active(now_ns) of an entry (or None): 1 active, 0 lapsed, -1 on error.
 * An expiry beyond 64 bits is far in the future or the past: its sign says. */
static int
acl_active(PyObject *entry, int64_t now_ns)
{
    PyObject *value;
    int64_t expires;
    int active;
    if (entry == Py_None)
        return 1;
    if ((value = PyObject_GetAttr(entry, str_expires_ns)) == NULL)
        return -1;
    if (value == Py_None)
        active = 1;
    else if (as_i64(value, &expires))
        active = now_ns < expires;
    else if (PyLong_Check(value))
        active = PyObject_RichCompareBool(value, long_zero, Py_GT);
    else {
        PyErr_SetString(PyExc_TypeError, "an access-list entry's expires_ns must be an int");
        active = -1;
    }
    Py_DECREF(value);
    return active;
}

/* The configuration entry found in a configuration probe's table: the entry if
 * it is active (a new reference), None if it is not, NULL on error. */
static PyObject *
config_match(PyObject *found, int64_t now_ns)
{
    PyObject *entry = found;
    int rc;
    Py_INCREF(found);   /* (acl_active may run Python code that changes the table) */
    if ((rc = acl_active(entry, now_ns)) <= 0)
        entry = rc < 0 ? NULL : Py_None;
    Py_XINCREF(entry);
    Py_DECREF(found);
    return entry;
}

/*
 * The longest-prefix match of acl.longest_match (its reference model) over both
 * layers: the configuration's probes, AccessList.probes(width) ((prefix length,
 * AddressTable) pairs, longest first), and the blocklist's BlockTable (or
 * NULL). The prefix lengths of both are walked longest first; at each, the
 * BlockTable's verdict if there is one and it is active, else the
 * configuration's entry if there is one and it is active. A lapsed entry
 * uncovers the shorter prefixes. A new reference (None: no entry), NULL on error.
 */
static PyObject *
longest_match_in(PyObject *probes, BlockTable *block, const unsigned char *packed,
                 int packed_len, int64_t now_ns)
{
    Py_ssize_t next_probe = 0, n = PyTuple_GET_SIZE(probes);
    int v6 = packed_len == 16, rc;
    uint64_t hi = 0, lo = 0, used[3] = {0, 0, 0};
    long config = -1, blocked = -1;   /* the next length of each layer, -1: none left */
    PyObject *config_table = NULL;
    if (block != NULL) {
        Key address = address_key(packed, packed_len);   /* IPv4 in lo; IPv6 hi, lo */
        memcpy(used, block->used[v6], sizeof used);   /* (a copy: see block_find below) */
        hi = address.hi;
        lo = address.lo;
        blocked = longest_below(used, 8 * packed_len + 1);
    }
    for (;;) {
        long prefixlen;
        if (config < 0 && next_probe < n) {
            PyObject *probe = PyTuple_GET_ITEM(probes, next_probe++);
            if (!PyTuple_Check(probe) || PyTuple_GET_SIZE(probe) != 2
                    || Py_TYPE(PyTuple_GET_ITEM(probe, 1)) != &AddressTableType) {
                PyErr_SetString(PyExc_TypeError, "probes must be (prefix length, AddressTable)");
                return NULL;
            }
            config = PyLong_AsLong(PyTuple_GET_ITEM(probe, 0));
            if (config < 0 || config > 8L * packed_len) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a prefix longer than the address");
                return NULL;
            }
            config_table = PyTuple_GET_ITEM(probe, 1);
        }
        prefixlen = config > blocked ? config : blocked;
        if (prefixlen < 0)
            break;
        if (prefixlen == blocked) {
            /* Looked up afresh each time: an expires_ns that ran Python code may have
             * changed the table (a sub-table in the copied bitmap may be gone). */
            PyObject *verdict = block_find(block, v6, hi, lo, (int)prefixlen);
            blocked = longest_below(used, (int)prefixlen);
            if (verdict != NULL) {
                Py_INCREF(verdict);
                if ((rc = acl_active(verdict, now_ns)) != 0) {
                    if (rc < 0)
                        Py_CLEAR(verdict);
                    return verdict;
                }
                Py_DECREF(verdict);
            }
        }
        if (prefixlen == config) {
            unsigned char key[16];
            int size = prefixlen > 8 ? (int)(prefixlen + 7) / 8 : 1;
            int spare = 8 * size - (int)prefixlen;
            PyObject *found, *entry;
            memcpy(key, packed, size);
            key[size - 1] = (unsigned char)(key[size - 1] >> spare << spare);
            config = -1;
            found = table_find((AddressTable *)config_table, address_key(key, size));
            if (found == NULL)
                continue;
            if ((entry = config_match(found, now_ns)) != Py_None)
                return entry;   /* (or NULL) */
            Py_DECREF(entry);
        }
    }
    Py_RETURN_NONE;
}

/* longest_match(probes, block, packed, now_ns): the compiled AccessList.lookup. */
static PyObject *
longest_match(PyObject *module, PyObject *args)
{
    PyObject *probes, *block, *entry = NULL;
    Py_buffer packed;
    long long now_ns;
    (void)module;
    if (!PyArg_ParseTuple(args, "O!Oy*L:longest_match", &PyTuple_Type, &probes, &block,
                          &packed, &now_ns))
        return NULL;
    if (block != Py_None && Py_TYPE(block) != &BlockTableType)
        PyErr_Format(PyExc_TypeError, "longest_match(): block is a BlockTable or None, "
                     "not %.100s", Py_TYPE(block)->tp_name);
    else if (packed.len != 4 && packed.len != 16)
        PyErr_SetString(PyExc_ValueError, "an address is 4 or 16 bytes");
    else
        entry = longest_match_in(probes, block == Py_None ? NULL : (BlockTable *)block,
                                 packed.buf, (int)packed.len, now_ns);
    PyBuffer_Release(&packed);
    return entry;
}

/* The source's access-list entry as Pipeline.decide finds it (AccessList.lookup):
 * a new reference, skipped when the list cannot hold one. */
static PyObject *
acl_lookup(Lane *L, const unsigned char *packed, int packed_len, int64_t recv_ns)
{
    if (L->acl_empty || (packed_len == 16 && !L->acl_covers_v6)) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    return longest_match_in(packed_len == 4 ? L->probes4 : L->probes6, (BlockTable *)L->block,
                            packed, packed_len, recv_ns);
}

/* Pipeline.decide step 4 for a request without a MAC: must this source
 * authenticate (authenticator.required_for, pure)? 1 yes, 0 no, -1 error. */
static int
must_authenticate(Lane *L, const unsigned char *packed, int packed_len)
{
    PyObject *key, *answer;
    int yes;
    if (L->required_for == Py_None)
        return 0;
    if ((key = PyBytes_FromStringAndSize((const char *)packed, packed_len)) == NULL)
        return -1;
    answer = PyObject_CallOneArg(L->required_for, key);
    Py_DECREF(key);
    if (answer == NULL)
        return -1;
    yes = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return yes;
}

/* What the auth stage makes of a longer request (decide_longer): no MAC; a MAC
 * that fails, as no key is configured; a MAC (or a tail that may be one) for
 * the authenticator to verify; NTS fields for the NTS stage (a request it
 * claims, without a MAC). */
enum { MAC_NONE, MAC_FAILS, MAC_VERIFY, MAC_NTS };

/* The datagram being decided as bytes (borrowed: L->datagram keeps it until the
 * decision ends), made once however many calls need it. */
static PyObject *
datagram_bytes(Lane *L)
{
    PyObject *data;
    Py_ssize_t length = L->datagram_len;
    if (L->datagram != NULL)
        return L->datagram;
    if ((data = PyBytes_FromStringAndSize(NULL, length)) == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(data), L->datagram_head, HEAD);
    memcpy(PyBytes_AS_STRING(data) + HEAD, L->datagram_tail, length - HEAD);
    L->datagram = data;
    return data;
}

/* The NTS stage's decide() for a request it claimed (pure: it opens a cookie):
 * *kind becomes ACL_DROP with *why NTS_REJECTED (malformed, or it fails), or
 * NTS_NAK (a cookie that does not open); either way, or for an answer, the
 * stage's finish() (which completes the reply) is left in L->signer. 1, or -1. */
static int
nts_verdict(Lane *L, int *kind, int *why)
{
    PyObject *data, *answer, *finish;
    int nak;
    if ((data = datagram_bytes(L)) == NULL
            || (answer = PyObject_CallOneArg(L->nts_decide, data)) == NULL)
        return -1;
    if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) != 2
            || !PyUnicode_Check(PyTuple_GET_ITEM(answer, 0))) {
        Py_DECREF(answer);
        PyErr_SetString(PyExc_TypeError, "the NTS stage's decide must return (kind, finish)");
        return -1;
    }
    finish = PyTuple_GET_ITEM(answer, 1);
    nak = PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(answer, 0), "nak") == 0;
    if (finish == Py_None) {
        *kind = ACL_DROP;
        *why = L->reason_nts_rejected;
    } else {
        if (nak)
            *kind = NTS_NAK;
        Py_INCREF(finish);
        Py_XSETREF(L->signer, finish);
    }
    Py_DECREF(answer);
    return 1;
}

/* Pipeline.verify_mac about the datagram being decided (pure: it asks the
 * authenticator): *why the reason to refuse it, or -1 with L->signer set when
 * its MAC verified (else NULL). 1, or -1 on error. */
static int
mac_verdict(Lane *L, int *why)
{
    PyObject *data, *port, *answer, *refused;
    int64_t reason;
    *why = -1;
    if ((data = datagram_bytes(L)) == NULL)
        return -1;
    port = PyLong_FromLong(L->datagram_port);
    answer = port == NULL ? NULL : PyObject_CallFunctionObjArgs(L->verify_mac, data, port, NULL);
    Py_XDECREF(port);
    if (answer == NULL)
        return -1;
    if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) != 2) {
        Py_DECREF(answer);
        PyErr_SetString(PyExc_TypeError, "verify_mac must return (reason, signer)");
        return -1;
    }
    refused = PyTuple_GET_ITEM(answer, 0);
    if (refused != Py_None) {
        if (!as_i64(refused, &reason) || reason < 0 || reason >= L->n_reasons) {
            Py_DECREF(answer);
            PyErr_SetString(PyExc_TypeError, "verify_mac's reason must be a Reason");
            return -1;
        }
        *why = (int)reason;
    } else if (PyTuple_GET_ITEM(answer, 1) != Py_None) {
        Py_INCREF(PyTuple_GET_ITEM(answer, 1));
        Py_XSETREF(L->signer, PyTuple_GET_ITEM(answer, 1));
    }
    Py_DECREF(answer);
    return 1;
}

/* Step 4 after step 3, for a source the access list lets through (allowed or
 * exempt): a request whose MAC fails is dropped as AUTH_FAILED (mac: MAC_FAILS
 * where no key is configured; else Pipeline.verify_mac says, and a MAC that
 * verifies leaves its signer in L->signer); one without a MAC that verified,
 * from a source that must authenticate, as AUTH_REQUIRED (*kind becomes
 * ACL_DROP). 1, or -1 on error. */
static int
authenticated(Lane *L, const unsigned char *packed, int packed_len, int mac, int *kind,
              int *why)
{
    int must, refused;
    if (*kind != ACL_PASS && *kind != ACL_EXEMPT)
        return 1;
    if (mac == MAC_FAILS) {
        *kind = ACL_DROP;
        *why = L->reason_auth_failed;
        return 1;
    }
    if (mac == MAC_NTS) {
        if (nts_verdict(L, kind, why) < 0)
            return -1;
        if (*kind != ACL_PASS && *kind != ACL_EXEMPT)
            return 1;
        if (L->signer != NULL)   /* (the stage always finishes an answer it allows) */
            return 1;
    }
    if (mac == MAC_VERIFY) {
        if (mac_verdict(L, &refused) < 0)
            return -1;
        if (refused >= 0) {
            *kind = ACL_DROP;
            *why = refused;
            return 1;
        }
        if (L->signer != NULL)
            return 1;
    }
    if ((must = must_authenticate(L, packed, packed_len)) < 0)
        return -1;
    if (must) {
        *kind = ACL_DROP;
        *why = L->reason_auth_required;
    }
    return 1;
}

/* ReferenceModel._kod_allowed: the source's KoD guard, the KoD budget, the global budget. */
static inline int
kod_allowed(Lane *L, Record *record, int64_t now_ns)
{
    int64_t kod_tat = BUDGET(L, BUDGET_KOD) > now_ns ? BUDGET(L, BUDGET_KOD) : now_ns;
    if (now_ns - record->cell[L->i_last_kod].n < L->kod_interval
            || kod_tat - now_ns > L->kod_bucket_tolerance || !global_allows(L, now_ns))
        return 0;
    BUDGET(L, BUDGET_KOD) = kod_tat + L->kod_bucket_interval;
    record->cell[L->i_last_kod].n = now_ns;
    return 1;
}

/* ReferenceModel._kod: count it, build it. */
static inline int
send_kod(Lane *L, const unsigned char *d, Record *record, int base, const char *code,
         int why, unsigned char *out, int *reason, int *reply)
{
    record->cell[L->i_kods].n++;
    COUNT(L, base + why)++;
    kod_reply(L, d, code, L->kod_min_poll, out);
    *reason = why;
    *reply = REPLY_KOD;
    return 1;
}

/* A counted drop charged to the source. */
static inline int
drop_charged(Lane *L, Record *record, int base, int why, int *reason)
{
    record->cell[L->i_drops].n++;
    COUNT(L, base + why)++;
    *reason = why;
    return 1;
}

/* A time reply (its first 40 bytes into out) for reason why (ANSWERED, LEAKED). */
static inline int
time_answer(Lane *L, const unsigned char *d, Record *record, int base, int why,
            int64_t recv_ns, unsigned char *out, int *reason, int *reply)
{
    COUNT(L, base + why)++;
    record->cell[L->i_time_replies].n++;
    L->fast_decisions++;
    time_reply_head(L, d, recv_ns, out);
    *reason = why;
    *reply = REPLY_TIME;
    return 1;
}

/* The end of Pipeline.decide: the global cap, then the answer. */
static inline int
capped_answer(Lane *L, const unsigned char *d, Record *record, int base, int64_t recv_ns,
              int64_t now_ns, unsigned char *out, int *reason, int *reply)
{
    if (!global_allows(L, now_ns))
        return drop_charged(L, record, base, L->reason_global_cap, reason);
    return time_answer(L, d, record, base, 0, recv_ns, out, reason, reply);   /* ANSWERED */
}

/* ---- the tables' own rules (filter/buckets.py), for first sightings */

/* obj.name += 1 (a table's or the pipeline's counter). */
static int
bump_attr(PyObject *obj, PyObject *name)
{
    PyObject *old = PyObject_GetAttr(obj, name), *now;
    int rc;
    if (old == NULL)
        return -1;
    now = PyNumber_Add(old, long_one);
    Py_DECREF(old);
    if (now == NULL)
        return -1;
    rc = PyObject_SetAttr(obj, name, now);
    Py_DECREF(now);
    return rc;
}

/* One side of the filter's state: a BucketTable and its records. */
typedef struct {
    PyObject *table;
    AddressTable *records;
    int64_t max_entries;
} Table;

/* BucketTable._evict_one: 1 if an entry was evicted, 0 if none, -1 on error. */
static int
evict_one(Lane *L, Table *t, int64_t now_ns)
{
    AddressTable *records = t->records;
    Py_ssize_t scan = records->count, i;
    if (scan > L->eviction_scan)
        scan = (Py_ssize_t)L->eviction_scan;
    for (i = 0; i < scan; i++) {
        uint32_t oldest = records->head;
        PyObject *record = records->slots[oldest].value;
        int full;
        if (Py_TYPE(record) == &RecordType && !IS_OBJECT((Record *)record, 0)
                && (Py_SIZE(record) != RECORD_CELLS || t->table != L->sources
                    || !IS_OBJECT((Record *)record, L->i_other_tat)))
            /* BucketTable.tat_cells: a source's other-class bucket must be full too */
            full = ((Record *)record)->cell[0].n <= now_ns
                   && (Py_SIZE(record) != RECORD_CELLS || t->table != L->sources
                       || ((Record *)record)->cell[L->i_other_tat].n <= now_ns);
        else {   /* any other sequence: compare as Python does, cell by cell */
            Py_ssize_t cells[2] = {0, L->i_other_tat}, n = t->table == L->sources ? 2 : 1, c;
            Py_ssize_t length;
            uint64_t version = records->version;
            Py_INCREF(record);
            length = PySequence_Size(record);
            full = length < 0 ? -1 : 1;
            for (c = 0; c < n && full == 1; c++) {
                PyObject *tat, *now;
                if (cells[c] >= length)
                    continue;
                tat = PySequence_GetItem(record, cells[c]);
                now = PyLong_FromLongLong(now_ns);
                full = tat && now ? PyObject_RichCompareBool(tat, now, Py_LE) : -1;
                Py_XDECREF(tat);
                Py_XDECREF(now);
            }
            Py_DECREF(record);
            if (full >= 0 && version != records->version) {
                PyErr_SetString(PyExc_RuntimeError, "a table changed during eviction");
                full = -1;
            }
            if (full < 0)
                return -1;
        }
        if (full) {
            Py_DECREF(table_remove_slot(records, oldest));
            return bump_attr(t->table, str_evictions) < 0 ? -1 : 1;
        }
        table_move_to_end(records, oldest);
    }
    return 0;
}

/* BucketTable.admit: 1 if record went in under key, 0 if there was no room. */
static int
table_admit(Lane *L, Table *t, Key k, PyObject *record, int64_t now_ns)
{
    if (t->records->count >= t->max_entries) {
        int evicted = evict_one(L, t, now_ns);
        if (evicted <= 0)
            return evicted < 0 || bump_attr(t->table, str_admissions_refused) < 0 ? -1 : 0;
    }
    return table_put(t->records, k, record) < 0 ? -1 : 1;
}

/* new_record(now_ns, label, port) as a Record. */
static Record *
new_source_record(Lane *L, int64_t now_ns, int slot, int port, int ttl)
{
    Record *r = (Record *)RecordType.tp_alloc(&RecordType, RECORD_CELLS);
    if (r == NULL)
        return NULL;
    r->cell[L->i_tat].n = now_ns;
    r->cell[L->i_first_seen].n = now_ns;
    r->cell[L->i_last_seen].n = now_ns;
    r->cell[L->i_last_kod].n = L->never;
    r->cell[L->i_acl_generation].n = -1;
    r->cell[L->i_port].n = port;
    r->cell[L->i_home_ttl].n = ttl;
    r->cell[L->i_other_ttl].n = -1;
    r->cell[L->i_last_crowd].n = 1;
    r->cell[L->i_other_tat].n = L->never;
    r->cell[L->i_window_start].n = now_ns;
    r->cell[L->i_crowd].n = 1;
    Py_INCREF(L->labels[slot]);
    r->cell[L->i_label].o = L->labels[slot];
    Py_INCREF(Py_None);
    r->cell[L->i_acl_entry].o = Py_None;
    r->objects = (1u << L->i_label) | (1u << L->i_acl_entry);
    return r;
}

/* A first sighting once the table is full: Pipeline.decide's `newcomer`. */
typedef struct {
    int newcomer;          /* not in the source table (yet) */
    Key k;                 /* its key in the source table and in the ring */
} Sighting;

/* ReferenceModel._establish: move a newcomer into the source table. */
static int
establish(Lane *L, Sighting *s, Record *record, int64_t now_ns)
{
    Table sources = {L->sources, SOURCE_TABLE(L), L->max_sources};
    int admitted = table_admit(L, &sources, s->k, (PyObject *)record, now_ns);
    if (admitted > 0) {
        ring_pop((NewcomerRing *)L->ring, s->k, NULL);
        s->newcomer = 0;
    }
    return admitted;
}

/*
 * ReferenceModel._observe: account one request to its source's traffic class and crowd
 * estimate. Returns the cell of the bucket it is charged to; *crowd the divisor
 * of that bucket's interval, *contested whether the address is contested.
 */
/* crowd.initial_ttl */
static inline int64_t
initial_ttl(Lane *L, int64_t ttl)
{
    int i;
    for (i = 0; i < 3; i++)
        if (ttl <= L->initial_ttls[i])
            return L->initial_ttls[i];
    return L->initial_ttls[2];
}

static int
observe(Lane *L, Record *record, int port, int ttl, int64_t gap_ns, int64_t now_ns,
        int64_t *crowd, int *contested)
{
    int64_t home_ttl, other_ttl;
    int tat_cell = L->i_tat;
    int64_t since = now_ns - L->class_memory_ns, started, sketch, mean, dev;
    if (L->ttl_classes && ttl >= 0) {
        int64_t home = record->cell[L->i_home_ttl].n;
        if (home < 0)
            record->cell[L->i_home_ttl].n = ttl;
        else if (ttl - home > L->ttl_slack || home - ttl > L->ttl_slack) {
            tat_cell = L->i_other_tat;
            record->cell[L->i_other_ttl].n = ttl;
        }
    }
    /* contested: crowd.same_initial_ttl, and both classes active */
    home_ttl = record->cell[L->i_home_ttl].n;
    other_ttl = record->cell[L->i_other_ttl].n;
    *contested = home_ttl >= 0 && other_ttl >= 0
             && initial_ttl(L, home_ttl) == initial_ttl(L, other_ttl)
             && (tat_cell == L->i_other_tat || record->cell[L->i_other_tat].n > since)
             && (tat_cell == L->i_tat || record->cell[L->i_tat].n > since);
    *crowd = 1;
    if (L->max_crowd == 1)
        return tat_cell;
    started = record->cell[L->i_window_start].n;
    if (now_ns - started >= L->crowd_window_ns) {
        record->cell[L->i_crowd].n = now_ns - started < 2 * L->crowd_window_ns
            ? L->crowd_of_bits[__builtin_popcountll(
                  (unsigned long long)record->cell[L->i_port_sketch].n)]
            : 1;
        record->cell[L->i_port_sketch].n = 0;
        record->cell[L->i_window_start].n = now_ns;
    }
    sketch = record->cell[L->i_port_sketch].n | (int64_t)(1ULL << (port % L->sketch_bits));
    record->cell[L->i_port_sketch].n = sketch;
    if (gap_ns > 0) {
        mean = record->cell[L->i_gap_mean].n;
        if (mean == 0) {
            record->cell[L->i_gap_mean].n = gap_ns;
            record->cell[L->i_gap_dev].n = gap_ns >> 1;
        } else {
            int64_t deviation = gap_ns >= mean ? gap_ns - mean : mean - gap_ns;
            dev = record->cell[L->i_gap_dev].n;
            /* >> on a negative int64 is an arithmetic (floor) shift in gcc and clang,
             * as Python's is. */
            record->cell[L->i_gap_mean].n = mean + ((gap_ns - mean) >> L->ewma_shift);
            record->cell[L->i_gap_dev].n = dev + ((deviation - dev) >> L->ewma_shift);
        }
    }
    mean = record->cell[L->i_gap_mean].n;
    dev = record->cell[L->i_gap_dev].n;
    *crowd = 1;
    if (!*contested && mean > 0
            && (__int128)dev * L->irregular_den >= (__int128)mean * L->irregular_num) {
        /* crowd.extrapolated */
        int64_t estimate = L->crowd_of_bits[__builtin_popcountll((unsigned long long)sketch)];
        int64_t elapsed = now_ns - record->cell[L->i_window_start].n;
        int64_t least = L->crowd_window_ns >> 3;
        estimate = 1 + (estimate - 1) * L->crowd_window_ns / (elapsed > least ? elapsed : least);
        if (record->cell[L->i_crowd].n > estimate)
            estimate = record->cell[L->i_crowd].n;
        *crowd = estimate < L->max_crowd ? estimate : L->max_crowd;
    }
    if (*crowd > record->cell[L->i_last_crowd].n) {   /* repriced at the bigger crowd */
        int64_t tat = record->cell[tat_cell].n;
        if (tat > now_ns)
            record->cell[tat_cell].n = now_ns + (int64_t)((__int128)(tat - now_ns)
                                                          * record->cell[L->i_last_crowd].n
                                                          / *crowd);
    }
    record->cell[L->i_last_crowd].n = *crowd;
    return tat_cell;
}

/*
 * Stages 5-7 of Pipeline.decide on a record already updated for this request
 * (from `if not exempt:` on): the source and prefix buckets, over the limit
 * (ReferenceModel._over_limit: leak, RATE KoD, drop), the global cap, the reply.
 * prefix NULL: the prefix is not in its table yet (created and admitted here,
 * else the shared overflow record). s: a first sighting, or NULL. Called only
 * once every check is passed: it decides, it never hands back to Python.
 */
static int
buckets(Lane *L, const unsigned char *d, Record *record, Record *prefix, Key pkey, int slot,
        int base, int port, int ttl, int64_t gap_ns, int64_t recv_ns, int64_t now_ns,
        Sighting *s, unsigned char *out, int *reason, int *reply)
{
    int64_t crowd, tat, prefix_tat;
    int over, leak = 0, contested;
    int tat_cell = observe(L, record, port, ttl, gap_ns, now_ns, &crowd, &contested);
    tat = record->cell[tat_cell].n;
    if (tat < now_ns)
        tat = now_ns;
    if (prefix == NULL) {
        Table prefixes = {L->prefixes, PREFIX_TABLE(L), L->max_prefixes};
        Record *fresh = (Record *)RecordType.tp_alloc(&RecordType, 1);
        int admitted = fresh ? 0 : -1;
        if (fresh != NULL) {
            fresh->cell[0].n = now_ns;
            admitted = table_admit(L, &prefixes, pkey, (PyObject *)fresh, now_ns);
        }
        Py_XDECREF(fresh);   /* held by the table if admitted */
        if (admitted < 0)
            return -1;
        prefix = admitted ? fresh : (Record *)L->prefix_overflow;
    }
    prefix_tat = prefix->cell[0].n;
    if (prefix_tat < now_ns)
        prefix_tat = now_ns;
    over = tat - now_ns > L->tolerance[slot] || prefix_tat - now_ns > L->prefix_tolerance;
    if (over) {
        /* 6. over the limit: the leak draws from the pipeline's own stream, as Python does */
        if (L->leak_share > 0.0) {
            PyObject *drawn = PyObject_CallNoArgs(L->random);
            double x;
            if (drawn == NULL)
                return -1;
            x = PyFloat_AsDouble(drawn);
            Py_DECREF(drawn);
            if (x == -1.0 && PyErr_Occurred())
                return -1;
            leak = x < L->leak_share && global_allows(L, now_ns);
        }
        if (leak)
            return time_answer(L, d, record, base, L->reason_leaked, recv_ns, out, reason,
                               reply);
        if (L->send_kod && L->kod_of_first[slot] && !contested) {
            int kod = 1;
            if (s != NULL && s->newcomer && (kod = establish(L, s, record, now_ns)) < 0)
                return -1;
            if (kod && kod_allowed(L, record, now_ns))
                return send_kod(L, d, record, base, "RATE", L->reason_rate_kod, out, reason,
                                reply);
        }
        COUNT(L, base + L->reason_rate_limited)++;
        record->cell[L->i_drops].n++;
        *reason = L->reason_rate_limited;
        return 1;
    }
    prefix->cell[0].n = prefix_tat + L->prefix_interval;
    record->cell[tat_cell].n = tat + L->interval[slot] / crowd;
    if (s != NULL && s->newcomer
            && ring_remember((NewcomerRing *)L->ring, s->k, record->cell[L->i_tat].n) < 0)
        return -1;
    return capped_answer(L, d, record, base, recv_ns, now_ns, out, reason, reply);   /* 7. */
}

/* The prefix's record for buckets(): *prefix set (NULL: not in the table, to be
 * created) and 1, or 0 when Python must decide (an odd record, or a key in
 * the dict but not the index), -1 on error. */
static int
find_prefix(Lane *L, const unsigned char *packed, int packed_len, Record **prefix, Key *pkey)
{
    PyObject *found;
    *pkey = prefix_key(L, packed, packed_len);
    found = table_find(PREFIX_TABLE(L), *pkey);
    if (found != NULL) {
        if (Py_TYPE(found) != &RecordType || !record_time((Record *)found, 0))
            return foreign_record("prefix");
        *prefix = (Record *)found;
        return 1;
    }
    *prefix = NULL;
    return 1;
}

/*
 * Pipeline.decide for a source whose access-list entry is exempt, a drop or a
 * deny, once the record is committed: an exempt source skips the buckets (the
 * global cap still counts); a deny sends a DENY KoD when the source's guard and
 * the KoD budget allow (a newcomer must find room among established sources
 * first, to keep its guard time), else it is dropped like a drop; a request
 * whose NTS cookie did not open gets the NTS NAK (a KoD with NTSN). s: a first
 * sighting, or NULL.
 */
static int
listed(Lane *L, const unsigned char *d, Record *record, Sighting *s, int base, int kind,
       int why, int64_t recv_ns, int64_t now_ns, unsigned char *out, int *reason, int *reply)
{
    if (kind == ACL_EXEMPT)
        return capped_answer(L, d, record, base, recv_ns, now_ns, out, reason, reply);
    if (kind == NTS_NAK) {   /* back to NTS-KE: no guard, no budget, the request's poll */
        record->cell[L->i_kods].n++;
        COUNT(L, base + L->reason_nts_nak)++;
        kod_reply(L, d, "NTSN", 0, out);
        *reason = L->reason_nts_nak;
        *reply = REPLY_KOD;
        return 1;
    }
    if (kind == ACL_DENY) {
        int room = 1;
        if (s != NULL && s->newcomer && (room = establish(L, s, record, now_ns)) < 0)
            return -1;
        if (room && kod_allowed(L, record, now_ns))
            return send_kod(L, d, record, base, "DENY", L->reason_deny_kod, out, reason, reply);
    }
    return drop_charged(L, record, base, why, reason);
}

/*
 * A source the table does not hold (Pipeline.decide's `record is None`): a
 * first request while there is room (inserted), once the table is full a
 * newcomer (remembered in the ring), or a returning newcomer (promoted if the
 * table admits it). The access-list entry (looked up as Python would;
 * lookup() is pure), the auth stage and the prefix record are read before
 * anything changes.
 */
static int
first_sighting(Lane *L, const unsigned char *d, int mac, const unsigned char *packed,
               int packed_len, int port, int ttl, int slot, int base, int64_t recv_ns,
               int64_t now_ns, unsigned char *out, int *reason, int *reply)
{
    Table sources = {L->sources, SOURCE_TABLE(L), L->max_sources};
    NewcomerRing *ring = (NewcomerRing *)L->ring;
    Sighting s;
    PyObject *entry = Py_None;
    Record *record = NULL, *prefix = NULL;
    RingSlot *remembered;
    Key pkey = {0, 0, 0};
    int acl_kind, acl_why, rc;

    s.newcomer = 0;
    s.k = source_key(L, packed, packed_len);
    if ((entry = acl_lookup(L, packed, packed_len, recv_ns)) == NULL)   /* 3. */
        return -1;
    if ((rc = acl_verdict(L, entry, &acl_kind, &acl_why)) <= 0
            || (rc = authenticated(L, packed, packed_len, mac, &acl_kind, &acl_why)) < 0)
        goto done;
    if (acl_kind == ACL_PASS && (rc = find_prefix(L, packed, packed_len, &prefix, &pkey)) <= 0)
        goto done;

    /* From here on this packet is decided here, in Pipeline.decide's order. */
    LABEL_COUNT(L, slot)++;
    if ((record = new_source_record(L, now_ns, slot, port, ttl)) == NULL) {
        rc = -1;
        goto done;
    }
    remembered = ring_find(ring, s.k);
    if (remembered == NULL) {
        if (sources.records->count < L->max_sources) {
            if (table_put(sources.records, s.k, (PyObject *)record) < 0) {
                rc = -1;
                goto done;
            }
        } else
            s.newcomer = 1;
    } else {   /* a returning newcomer: promoted if the table admits it */
        int admitted;
        record->cell[L->i_tat].n = remembered->tat;
        record->cell[L->i_requests].n = 1;
        admitted = table_admit(L, &sources, s.k, (PyObject *)record, now_ns);
        if (admitted < 0) {
            rc = -1;
            goto done;
        }
        if (admitted) {
            ring_pop(ring, s.k, NULL);
            L->promotions++;
        } else {
            s.newcomer = 1;
            if (bump_attr(L->pipeline, str_table_full) < 0) {
                rc = -1;
                goto done;
            }
        }
    }
    record->cell[L->i_requests].n++;
    record->cell[L->i_acl_generation].n = L->acl_generation;
    Py_INCREF(entry);
    Py_SETREF(record->cell[L->i_acl_entry].o, entry);
    L->first_sightings++;
    if (acl_kind == ACL_PASS)   /* A new record: LAST_SEEN is now, so no gap. */
        rc = buckets(L, d, record, prefix, pkey, slot, base, port, ttl, 0, recv_ns, now_ns,
                     &s, out, reason, reply);
    else
        rc = listed(L, d, record, &s, base, acl_kind, acl_why, recv_ns, now_ns, out, reason,
                    reply);
done:
    Py_XDECREF(record);
    Py_DECREF(entry);
    return rc;
}

/*
 * Pipeline.decide for a request whose length and tail are sane (see this
 * file's top): d is its header; mac says what the auth stage makes of its
 * tail, and claimed whether the NTS stage claimed it (its label)
 * (decide_longer; for 48 bytes MAC_NONE and 0). Returns 1 (*reason and *reply
 * set: a time reply's first 40 bytes or a KoD's 48 are in out), or -1 on a
 * Python error.
 */
static int
fast_decide(Lane *L, const unsigned char *d, int mac, int claimed, const unsigned char *packed,
            int packed_len, int port, int ttl, int64_t recv_ns, int64_t now_ns,
            unsigned char *out, int *reason, int *reply)
{
    unsigned first = d[0];
    int base = (int)((first >> 3) & 7) * L->n_reasons;
    int drop = first_byte_drop(L, first, port);
    int slot = claimed ? NTS_SLOT : label_slot(L, first, port), rc;
    PyObject *found, *entry;
    Record *record, *prefix = NULL;
    Key pkey = {0, 0, 0};
    int64_t generation, ignored, gap_ns;
    int looked_up, acl_kind, acl_why;

    *reply = REPLY_NONE;
    now_ns = clamped_now(L, now_ns);
    if (drop >= 0) {                       /* 1. sanity, by first byte */
        COUNT(L, base + drop)++;
        *reason = drop;
        return 1;
    }
    if (L->reflection[port >> 3] & (1u << (port & 7))) {   /* 2. reflection */
        COUNT(L, base + L->reason_reflection)++;
        *reason = L->reason_reflection;
        return 1;
    }

    /* Read everything first: a packet that leaves here must leave nothing changed. */
    found = table_find(SOURCE_TABLE(L), source_key(L, packed, packed_len));
    if (found == NULL)
        return first_sighting(L, d, mac, packed, packed_len, port, ttl, slot, base, recv_ns,
                              now_ns, out, reason, reply);
    if (Py_TYPE(found) != &RecordType || Py_SIZE(found) != RECORD_CELLS)
        return foreign_record("source");
    record = (Record *)found;
    if (!IS_OBJECT(record, L->i_acl_entry) || !IS_OBJECT(record, L->i_label)
            || !record_int(record, L->i_acl_generation, &generation))
        return foreign_record("source");
    /* The times in a record are those the filter writes (a clamped now, a TAT
     * ahead of one, "never"): within 2 * TIME_BOUND, so differences fit int64. */
    if (!record_time(record, L->i_tat) || !record_int(record, L->i_requests, &ignored)
            || !record_int(record, L->i_time_replies, &ignored)
            || !record_int(record, L->i_drops, &ignored)
            || !record_int(record, L->i_kods, &ignored)
            || !record_time(record, L->i_last_kod)
            || !record_time(record, L->i_last_seen)
            || !record_int(record, L->i_port, &ignored)
            || !record_int(record, L->i_home_ttl, &ignored)
            || !record_time(record, L->i_other_tat)
            || !record_int(record, L->i_port_sketch, &ignored) || ignored < 0
            || !record_time(record, L->i_window_start)
            || !record_int(record, L->i_crowd, &ignored)
            || !record_int(record, L->i_gap_mean, &ignored) || ignored < 0
            || !record_int(record, L->i_gap_dev, &ignored) || ignored < 0
            || !record_int(record, L->i_other_ttl, &ignored)
            || !record_int(record, L->i_last_crowd, &ignored) || ignored < 1)
        return foreign_record("source");
    gap_ns = now_ns - record->cell[L->i_last_seen].n;
    /* 4. authentication: authenticated(), below (a MAC fails, a source that must
     * authenticate and sent none is refused). */
    /* 3. access list: the record's cached entry while the list is the same and
     * the entry has not lapsed (IPv4); else, and always for IPv6 (whose source
     * key may hold sources with different entries), the list's own lookup, to
     * be cached as Python does. */
    entry = record->cell[L->i_acl_entry].o;
    looked_up = packed_len == 16 || generation != L->acl_generation;
    if (!looked_up && (rc = acl_active(entry, recv_ns)) != 1) {
        if (rc < 0)
            return -1;
        looked_up = 1;
    }
    if (looked_up) {
        if ((entry = acl_lookup(L, packed, packed_len, recv_ns)) == NULL)
            return -1;
    } else
        Py_INCREF(entry);
    if ((rc = acl_verdict(L, entry, &acl_kind, &acl_why)) <= 0
            || (rc = authenticated(L, packed, packed_len, mac, &acl_kind, &acl_why)) < 0
            || (acl_kind == ACL_PASS
                && (rc = find_prefix(L, packed, packed_len, &prefix, &pkey)) <= 0)) {
        Py_DECREF(entry);
        return rc;
    }

    /* Commit, as Pipeline.decide would have. */
    LABEL_COUNT(L, slot)++;
    record->cell[L->i_requests].n++;
    record->cell[L->i_last_seen].n = now_ns;
    set_label(L, record, slot);
    record->cell[L->i_port].n = port;
    if (looked_up) {
        record->cell[L->i_acl_generation].n = L->acl_generation;
        Py_SETREF(record->cell[L->i_acl_entry].o, entry);   /* the lookup's reference */
    } else
        Py_DECREF(entry);   /* the record keeps its own */
    Py_INCREF(record);   /* a prefix eviction runs Python-visible code: keep it alive */
    if (acl_kind == ACL_PASS)
        rc = buckets(L, d, record, prefix, pkey, slot, base, port, ttl, gap_ns, recv_ns,
                     now_ns, NULL, out, reason, reply);
    else
        rc = listed(L, d, record, NULL, base, acl_kind, acl_why, recv_ns, now_ns, out, reason,
                    reply);
    Py_DECREF(record);
    return rc;
}

/*
 * What follows the header of a datagram longer than 48 bytes, by wire.parse_tail's
 * rules (chrony 4.3's parse_packet): the tail of `remainder` bytes, for `version`.
 */
enum { TAIL_MALFORMED, TAIL_CRYPTO_NAK, TAIL_FIELDS, TAIL_FIELDS_OR_MAC, TAIL_MAC };

/* wire._is_ext_field: an RFC 7822 field at offset, whole and inside the tail. */
static int
is_ext_field(Lane *L, const unsigned char *tail, int remainder, int offset)
{
    int field_len;
    if (remainder - offset < L->min_ext_field)
        return 0;
    field_len = (tail[offset + 2] << 8) | tail[offset + 3];
    return field_len >= L->min_ext_field && field_len % 4 == 0
           && offset + field_len <= remainder;
}

/* wire._parse_extension_fields: fields, then an optional MAC. TAIL_FIELDS (no
 * MAC), TAIL_MAC (a MAC after the fields, or no fields), TAIL_MALFORMED. */
static int
extension_fields(Lane *L, const unsigned char *tail, int remainder)
{
    int offset = 0, fields = 0;
    while (offset < remainder) {
        if (L->min_mac <= remainder - offset && remainder - offset <= L->max_bare_mac)
            break;   /* the rest is a MAC (RFC 7822 section 7.5) */
        if (!is_ext_field(L, tail, remainder, offset))
            return TAIL_MALFORMED;
        offset += (tail[offset + 2] << 8) | tail[offset + 3];
        fields++;
    }
    return offset < remainder || !fields ? TAIL_MAC : TAIL_FIELDS;
}

/* wire.parse_tail and the request inspect_request makes of it: TAIL_FIELDS_OR_MAC
 * for fields with no MAC after them that could be read as one long MAC
 * (Request.whole_tail_mac). */
static int
tail_kind(Lane *L, int version, const unsigned char *tail, int remainder)
{
    int kind;
    if (version != 4)   /* v1-v3 have no extension fields: the tail is a MAC */
        return 4 <= remainder && remainder <= L->max_mac ? TAIL_MAC : TAIL_MALFORMED;
    if (remainder == L->crypto_nak_len && memcmp(tail, "\0\0\0\0", 4) == 0)
        return TAIL_CRYPTO_NAK;
    kind = extension_fields(L, tail, remainder);
    if (L->max_bare_mac < remainder && remainder <= L->max_mac)
        /* Old chrony clients and ntpdig send long MACs in NTPv4: a tail of 25-68
         * bytes that is not a clean run of extension fields is one. */
        return kind == TAIL_MALFORMED ? TAIL_MAC
               : kind == TAIL_FIELDS ? TAIL_FIELDS_OR_MAC : kind;
    return kind;
}

/*
 * A datagram that is not 48 bytes (length -1: truncated, handed on empty; tail:
 * its bytes after the header). Pipeline.decide's sanity stage
 * (responder.inspect_request) first: a length that is short or not a multiple
 * of 4 is malformed; a version or mode that the first byte rules out is dropped
 * as for 48 bytes; then the tail: malformed, or a crypto-NAK. A well-formed
 * request is then decided as a 48-byte one (fast_decide), its MAC failing
 * where no key is configured, else verified by Pipeline.verify_mac; where NTS
 * is on, the NTS stage is asked whether it claims it (its label) and, for one
 * without a MAC, to decide it. Those calls into Python are the auth stage's
 * cryptography; the rest is here. Returns as fast_decide does.
 */
static int
decide_longer(Lane *L, const unsigned char *d, const unsigned char *tail, Py_ssize_t length,
              const unsigned char *packed, int packed_len, int port, int ttl,
              int64_t recv_ns, int64_t now_ns, unsigned char *out, int *reason, int *reply)
{
    unsigned first = length > 0 ? d[0] : 0;
    int drop = first_byte_drop(L, first, port);
    int kind = TAIL_FIELDS, claimed = 0, mac;
    *reply = REPLY_NONE;
    if (length < HEAD || length % 4 != 0)
        drop = L->reason_malformed;
    else if (drop < 0) {
        kind = tail_kind(L, (first >> 3) & 7, tail, (int)(length - HEAD));
        drop = kind == TAIL_MALFORMED ? L->reason_malformed
               : kind == TAIL_CRYPTO_NAK ? L->reason_crypto_nak : -1;
    }
    if (drop >= 0) {
        COUNT(L, (int)((first >> 3) & 7) * L->n_reasons + drop)++;
        *reason = drop;
        return 1;
    }
    L->datagram_head = d;
    L->datagram_tail = tail;
    L->datagram_len = length;
    L->datagram_port = port;
    if (L->nts) {   /* the NTS stage's claims() (pure, cheap): its label, its stage */
        PyObject *data = datagram_bytes(L), *answer;
        if (data == NULL || (answer = PyObject_CallOneArg(L->nts_claims, data)) == NULL)
            return -1;
        claimed = PyObject_IsTrue(answer);
        Py_DECREF(answer);
        if (claimed < 0)
            return -1;
    }
    /* A claimed request without a MAC goes to the NTS stage (Pipeline.decide's
     * mac_key_id is None: no MAC after the fields, perhaps a whole-tail one). */
    mac = claimed && kind != TAIL_MAC ? MAC_NTS
          : kind == TAIL_FIELDS ? MAC_NONE : L->verifies_macs ? MAC_VERIFY
          : kind == TAIL_MAC ? MAC_FAILS : MAC_NONE;
    return fast_decide(L, d, mac, claimed, packed, packed_len, port, ttl, recv_ns, now_ns, out,
                       reason, reply);
}

/* Pipeline.decide(data, packed, port, recv_ns, now_ns, ttl) -> new reference to its
 * tuple: every packet, where the loop is only the socket layer (!L->enabled). */
static PyObject *
slow_decide(Lane *L, PyObject *data, const unsigned char *packed, int packed_len, int port,
            int ttl, int64_t recv_ns, int64_t now_ns)
{
    PyObject *args[6] = {data, NULL, NULL, NULL, NULL, NULL}, *result = NULL;
    int i;
    args[1] = PyBytes_FromStringAndSize((const char *)packed, packed_len);
    args[2] = PyLong_FromLong(port);
    args[3] = PyLong_FromLongLong(recv_ns);
    args[4] = PyLong_FromLongLong(now_ns);
    args[5] = PyLong_FromLong(ttl);
    if (args[1] && args[2] && args[3] && args[4] && args[5])
        result = PyObject_Vectorcall(L->decide, args, 6, NULL);
    for (i = 1; i < 6; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        return NULL;
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 3) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_TypeError, "decide must return (reason, reply, signer)");
        return NULL;
    }
    return result;
}

/* ------------------------------------------------------------------ the type */

static void
release_queue(Lane *L, int queued)
{
    int q;
    for (q = 0; q < queued; q++) {
        Py_CLEAR(L->queue[q].reply);
        Py_CLEAR(L->queue[q].signer);
    }
}

static void
release_config(Lane *L)
{
    int i;
    Py_CLEAR(L->pipeline);
    Py_CLEAR(L->decide);
    Py_CLEAR(L->index);
    Py_CLEAR(L->prefix_index);
    Py_CLEAR(L->random);
    Py_CLEAR(L->required_for);
    Py_CLEAR(L->verify_mac);
    Py_CLEAR(L->nts_claims);
    Py_CLEAR(L->nts_decide);
    Py_CLEAR(L->action_allow);
    Py_CLEAR(L->action_exempt);
    Py_CLEAR(L->action_drop);
    Py_CLEAR(L->action_deny);
    Py_CLEAR(L->counts);
    Py_CLEAR(L->label_counts);
    Py_CLEAR(L->label_cells);
    Py_CLEAR(L->acl);
    Py_CLEAR(L->probes4);   /* (the next begin() asks the new list for its own) */
    Py_CLEAR(L->probes6);
    Py_CLEAR(L->block);
    Py_CLEAR(L->responder);
    Py_CLEAR(L->sources);
    Py_CLEAR(L->prefixes);
    Py_CLEAR(L->ring);
    Py_CLEAR(L->prefix_overflow);
    Py_CLEAR(L->budgets);
    for (i = 0; i < LABEL_SLOTS; i++)
        Py_CLEAR(L->labels[i]);
    L->configured = 0;
}

static void
Lane_dealloc(Lane *L)
{
    if (L->queue != NULL)
        release_queue(L, L->batch);
    release_config(L);
    Py_CLEAR(L->signer);
    Py_CLEAR(L->datagram);
    free(L->heads);
    free(L->tails);
    free(L->names);
    free(L->control);
    free(L->out);
    free(L->rh);
    free(L->sh);
    free(L->riov);
    free(L->siov);
    free(L->queue);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static int
Lane_init(Lane *L, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fd", "v6", "batch", "slot", NULL};
    int fd, v6, batch = 64, slot = 2048, i, tail;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ip|ii", names, &fd, &v6, &batch, &slot))
        return -1;
    if (batch < 1 || batch > 1024 || slot <= HEAD || slot > 65536) {
        PyErr_SetString(PyExc_ValueError, "batch must be 1-1024 and slot 49-65536 bytes");
        return -1;
    }
    if (L->heads != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Lane is initialised once");
        return -1;
    }
    L->fd = fd;
    L->v6 = v6;
    L->batch = batch;
    L->slot = slot;
    L->name_len = v6 ? (int)sizeof(struct sockaddr_in6) : (int)sizeof(struct sockaddr_in);
    L->name_stride = 32;
    tail = slot - HEAD;
    L->heads = calloc(batch, HEAD);
    L->tails = calloc(batch, tail);
    L->names = calloc(batch, L->name_stride);
    L->control = calloc(batch, CONTROL_SPACE);
    L->out = calloc(batch, slot);
    L->rh = calloc(batch, sizeof(struct mmsghdr));
    L->sh = calloc(batch, sizeof(struct mmsghdr));
    L->riov = calloc(2 * batch, sizeof(struct iovec));
    L->siov = calloc(2 * batch, sizeof(struct iovec));
    L->queue = calloc(batch, sizeof(Queued));
    if (!L->heads || !L->tails || !L->names || !L->control || !L->out || !L->rh || !L->sh
            || !L->riov || !L->siov || !L->queue) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < batch; i++) {
        struct msghdr *h = &L->rh[i].msg_hdr;
        L->riov[2 * i].iov_base = L->heads + i * HEAD;
        L->riov[2 * i].iov_len = HEAD;
        L->riov[2 * i + 1].iov_base = L->tails + (size_t)i * tail;
        L->riov[2 * i + 1].iov_len = tail;
        h->msg_name = L->names + i * L->name_stride;
        h->msg_namelen = L->name_len;
        h->msg_iov = &L->riov[2 * i];
        h->msg_iovlen = 2;
        h->msg_control = L->control + i * CONTROL_SPACE;
        h->msg_controllen = CONTROL_SPACE;
        L->siov[2 * i].iov_base = L->out + (size_t)i * slot;
        L->siov[2 * i + 1].iov_base = L->xmt;
        L->siov[2 * i + 1].iov_len = 8;
        L->sh[i].msg_hdr.msg_iov = &L->siov[2 * i];
        L->sh[i].msg_hdr.msg_namelen = L->name_len;
    }
    L->used = batch;
    return 0;
}

/* -- configure(policy): a LanePolicy (guardntp/filter/lane.py). Its fields are read by
 * their path from the policy ("settings.kod.limit.interval_ns") and every error names
 * that path: AttributeError where a field is missing, TypeError where it has the wrong
 * type, ValueError where its value is out of range. Nothing is kept of the policy
 * object itself, only what is copied out of it. */

/* policy.<path>: a new reference, or NULL with the error set. */
static PyObject *
need(PyObject *policy, const char *path)
{
    const char *part = path;
    PyObject *value = policy;
    Py_INCREF(value);
    for (;;) {
        const char *dot = strchr(part, '.');
        size_t len = dot != NULL ? (size_t)(dot - part) : strlen(part);
        char name[64];
        PyObject *next;
        if (len >= sizeof(name)) {
            Py_DECREF(value);
            PyErr_Format(PyExc_SystemError, "lane policy path %s: a part is too long", path);
            return NULL;
        }
        memcpy(name, part, len);
        name[len] = '\0';
        next = PyObject_GetAttrString(value, name);
        Py_DECREF(value);
        if (next == NULL) {
            if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_AttributeError, "lane policy has no %s", path);
            }
            return NULL;
        }
        value = next;
        if (dot == NULL)
            return value;
        part = dot + 1;
    }
}

static int
need_int(PyObject *policy, const char *path, int64_t *out)
{
    PyObject *value = need(policy, path);
    int is_int;
    if (value == NULL)
        return -1;
    is_int = as_i64(value, out);
    Py_DECREF(value);
    if (!is_int) {
        PyErr_Format(PyExc_TypeError, "lane policy: %s must be an int that fits 64 bits", path);
        return -1;
    }
    return 0;
}

static int
need_flag(PyObject *policy, const char *path, int *out)
{
    PyObject *value = need(policy, path);
    int is_bool;
    if (value == NULL)
        return -1;
    is_bool = PyBool_Check(value);
    *out = value == Py_True;
    Py_DECREF(value);
    if (!is_bool) {
        PyErr_Format(PyExc_TypeError, "lane policy: %s must be True or False", path);
        return -1;
    }
    return 0;
}

static int
need_float(PyObject *policy, const char *path, double *out)
{
    PyObject *value = need(policy, path);
    if (value == NULL)
        return -1;
    if (!PyFloat_Check(value) && !PyLong_CheckExact(value)) {
        Py_DECREF(value);
        PyErr_Format(PyExc_TypeError, "lane policy: %s must be a float", path);
        return -1;
    }
    *out = PyFloat_AsDouble(value);   /* an int too large for a double: OverflowError */
    Py_DECREF(value);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* A Reason value: the column of the counters it is counted in. */
static int
need_reason(PyObject *policy, const char *path, int n_reasons, int *out)
{
    int64_t v;
    if (need_int(policy, path, &v) < 0)
        return -1;
    if (v < 0 || v >= n_reasons) {
        PyErr_Format(PyExc_ValueError, "lane policy: %s is not a reason", path);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int
need_bytes(PyObject *policy, const char *path, unsigned char *out, Py_ssize_t size)
{
    PyObject *value = need(policy, path);
    if (value == NULL)
        return -1;
    if (!PyBytes_Check(value) || PyBytes_GET_SIZE(value) != size) {
        Py_DECREF(value);
        PyErr_Format(PyExc_TypeError, "lane policy: %s must be %zd bytes", path, size);
        return -1;
    }
    memcpy(out, PyBytes_AS_STRING(value), size);
    Py_DECREF(value);
    return 0;
}

static int
need_int_tuple(PyObject *policy, const char *path, int64_t *out, Py_ssize_t size)
{
    PyObject *value = need(policy, path);
    Py_ssize_t i;
    if (value == NULL)
        return -1;
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != size) {
        Py_DECREF(value);
        PyErr_Format(PyExc_TypeError, "lane policy: %s must be a tuple of %zd ints", path,
                     size);
        return -1;
    }
    for (i = 0; i < size; i++)
        if (!as_i64(PyTuple_GET_ITEM(value, i), &out[i])) {
            Py_DECREF(value);
            PyErr_Format(PyExc_TypeError, "lane policy: %s must hold ints that fit 64 bits",
                         path);
            return -1;
        }
    Py_DECREF(value);
    return 0;
}

/* Each label slot's cell in the label counts: the index of its label in
 * objects.label_counts.labels (a tuple of str, one per cell). */
static int
label_cells_of(Lane *L)
{
    PyObject *names = PyObject_GetAttrString(L->label_counts, "labels");
    Py_ssize_t n = 0, k;
    int i, rc = 0;
    if (names == NULL)
        return -1;
    if (!PyTuple_Check(names) || (n = PyTuple_GET_SIZE(names)) != Py_SIZE(L->label_cells)) {
        Py_DECREF(names);
        PyErr_SetString(PyExc_TypeError, "lane policy: objects.label_counts.labels must be a "
                                         "tuple of one label per count");
        return -1;
    }
    for (i = 0; i < LABEL_SLOTS && rc == 0; i++) {
        L->label_index[i] = 0;
        if (L->labels[i] == NULL)
            continue;
        for (k = 0; k < n; k++) {
            int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(names, k), L->labels[i], Py_EQ);
            if (same < 0)
                rc = -1;
            if (same != 0)
                break;
        }
        if (rc == 0 && k == n) {
            PyErr_Format(PyExc_ValueError, "lane policy: the label %R has no count", L->labels[i]);
            rc = -1;
        }
        L->label_index[i] = (int)k;
    }
    Py_DECREF(names);
    return rc;
}

static PyObject *
Lane_configure(Lane *L, PyObject *policy)
{
    const struct { const char *path; PyObject **slot; } objects[] = {
        {"objects.pipeline", &L->pipeline}, {"objects.decide", &L->decide},
        {"objects.counts", &L->counts}, {"objects.label_counts", &L->label_counts},
        {"objects.acl", &L->acl}, {"objects.responder", &L->responder},
        {"objects.required_for", &L->required_for}, {"objects.verify_mac", &L->verify_mac},
        {"objects.nts_claims", &L->nts_claims}, {"objects.nts_decide", &L->nts_decide},
        {"objects.sources", &L->sources},
        {"objects.prefixes", &L->prefixes}, {"objects.newcomers", &L->ring},
        {"objects.prefix_overflow", &L->prefix_overflow}, {"objects.budgets", &L->budgets},
        {"settings.random", &L->random},
        {"contract.action_allow", &L->action_allow},
        {"contract.action_exempt", &L->action_exempt},
        {"contract.action_drop", &L->action_drop},
        {"contract.action_deny", &L->action_deny},
    };
    const struct { const char *path; int *slot; } cells[] = {
        {"contract.cells.tat", &L->i_tat}, {"contract.cells.requests", &L->i_requests},
        {"contract.cells.time_replies", &L->i_time_replies},
        {"contract.cells.kods", &L->i_kods}, {"contract.cells.drops", &L->i_drops},
        {"contract.cells.first_seen", &L->i_first_seen},
        {"contract.cells.last_seen", &L->i_last_seen},
        {"contract.cells.last_kod", &L->i_last_kod}, {"contract.cells.label", &L->i_label},
        {"contract.cells.acl_generation", &L->i_acl_generation},
        {"contract.cells.acl_entry", &L->i_acl_entry}, {"contract.cells.port", &L->i_port},
        {"contract.cells.home_ttl", &L->i_home_ttl},
        {"contract.cells.other_tat", &L->i_other_tat},
        {"contract.cells.port_sketch", &L->i_port_sketch},
        {"contract.cells.window_start", &L->i_window_start},
        {"contract.cells.crowd", &L->i_crowd}, {"contract.cells.gap_mean", &L->i_gap_mean},
        {"contract.cells.gap_dev", &L->i_gap_dev},
        {"contract.cells.other_ttl", &L->i_other_ttl},
        {"contract.cells.last_crowd", &L->i_last_crowd},
    };
    const struct { const char *path; int *slot; } reasons[] = {
        {"contract.reasons.reflection", &L->reason_reflection},
        {"contract.reasons.global_cap", &L->reason_global_cap},
        {"contract.reasons.last_time_reason", &L->last_time_reason},
        {"contract.reasons.leaked", &L->reason_leaked},
        {"contract.reasons.rate_kod", &L->reason_rate_kod},
        {"contract.reasons.rate_limited", &L->reason_rate_limited},
        {"contract.reasons.acl_deny", &L->reason_acl_deny},
        {"contract.reasons.blocklisted", &L->reason_blocklisted},
        {"contract.reasons.deny_kod", &L->reason_deny_kod},
        {"contract.reasons.malformed", &L->reason_malformed},
        {"contract.reasons.auth_required", &L->reason_auth_required},
        {"contract.reasons.auth_failed", &L->reason_auth_failed},
        {"contract.reasons.crypto_nak", &L->reason_crypto_nak},
        {"contract.reasons.nts_nak", &L->reason_nts_nak},
        {"contract.reasons.nts_rejected", &L->reason_nts_rejected},
    };
    const struct { const char *path; int *slot; } tail_lengths[] = {
        {"contract.tail.min_ext_field", &L->min_ext_field},
        {"contract.tail.min_mac", &L->min_mac},
        {"contract.tail.max_bare_mac", &L->max_bare_mac},
        {"contract.tail.max_mac", &L->max_mac},
        {"contract.tail.crypto_nak", &L->crypto_nak_len},
    };
    PyObject *labels, *value;
    int64_t v;
    unsigned char drop[256], drop_ntp_port[256];
    size_t i;
    int tables_compiled, enabled;
    release_config(L);
    for (i = 0; i < sizeof(objects) / sizeof(objects[0]); i++)
        if ((*objects[i].slot = need(policy, objects[i].path)) == NULL)
            goto fail;
    /* The tables' records, which the loop reads and writes as BucketTable does. */
    L->index = PyObject_GetAttrString(L->sources, "records");
    L->prefix_index = PyObject_GetAttrString(L->prefixes, "records");
    if (L->index == NULL || L->prefix_index == NULL)
        goto fail;
    if (Py_TYPE(L->counts) != &CountsType) {
        PyErr_SetString(PyExc_TypeError, "lane policy: objects.counts must be a Counts");
        goto fail;
    }
    L->label_cells = PyObject_GetAttrString(L->label_counts, "counts");
    if (L->label_cells == NULL)
        goto fail;
    if (Py_TYPE(L->label_cells) != &CountsType) {
        PyErr_SetString(PyExc_TypeError,
                        "lane policy: objects.label_counts.counts must be a Counts");
        goto fail;
    }
    if (!PyCallable_Check(L->random)) {
        PyErr_SetString(PyExc_TypeError, "lane policy: settings.random must be callable");
        goto fail;
    }
    /* Tables in Python (OrderedDicts: the reference model's): the reference model
     * decides every packet (enabled, below). */
    tables_compiled = Py_TYPE(L->index) == &AddressTableType
                      && Py_TYPE(L->prefix_index) == &AddressTableType;
    if (Py_TYPE(L->budgets) != &RecordType || Py_SIZE(L->budgets) != BUDGET_CELLS) {
        PyErr_SetString(PyExc_TypeError,
                        "lane policy: objects.budgets must be a Record of 2 cells");
        goto fail;
    }
    if (Py_TYPE(L->ring) != &NewcomerRingType || Py_TYPE(L->prefix_overflow) != &RecordType
            || IS_OBJECT((Record *)L->prefix_overflow, 0))
        Py_CLEAR(L->ring);   /* no C ring (or no Record to overflow into): Python's job */
    if ((labels = need(policy, "settings.labels")) == NULL)
        goto fail;
    if (!PyTuple_Check(labels) || PyTuple_GET_SIZE(labels) != LABEL_SLOTS) {
        Py_DECREF(labels);
        PyErr_SetString(PyExc_TypeError,
                        "lane policy: settings.labels must be a tuple of 259 (per label slot)");
        goto fail;
    }
    for (i = 0; i < LABEL_SLOTS; i++) {
        value = PyTuple_GET_ITEM(labels, i);
        L->labels[i] = value == Py_None ? NULL : (Py_INCREF(value), value);
    }
    Py_DECREF(labels);
    if (label_cells_of(L) < 0)
        goto fail;
    if (need_bytes(policy, "settings.drop_reason", drop, 256) < 0
            || need_bytes(policy, "settings.drop_reason_ntp_port", drop_ntp_port, 256) < 0
            || need_bytes(policy, "settings.reply_mode", L->reply_mode, 256) < 0
            || need_bytes(policy, "settings.reflection", L->reflection, 8192) < 0
            || need_int_tuple(policy, "settings.interval_ns", L->interval, LABEL_SLOTS) < 0
            || need_int_tuple(policy, "settings.tolerance_ns", L->tolerance, LABEL_SLOTS) < 0
            || need_bytes(policy, "settings.kod_of_first", L->kod_of_first, LABEL_SLOTS) < 0
            || need_int_tuple(policy, "contract.crowd.initial_ttls", L->initial_ttls, 3) < 0
            || need_int_tuple(policy, "settings.crowd_of_bits", L->crowd_of_bits, 64) < 0
            || need_int(policy, "settings.kod.guard_interval_ns", &L->kod_interval) < 0
            || need_int(policy, "settings.kod.limit.interval_ns", &L->kod_bucket_interval) < 0
            || need_int(policy, "settings.kod.limit.tolerance_ns", &L->kod_bucket_tolerance) < 0
            || need_int(policy, "settings.kod.min_poll", &L->kod_min_poll) < 0
            || need_float(policy, "settings.leak_share", &L->leak_share) < 0)
        goto fail;
    for (i = 0; i < 256; i++) {
        int labelled = ((i >> 3) & 7) == 1 ? L->labels[V1_NETGEAR] && L->labels[V1_OTHER]
                                            : L->labels[i] != NULL;
        L->drop_reason[i] = drop[i] == 255 ? -1 : (signed char)drop[i];
        L->drop_reason_ntp_port[i] = drop_ntp_port[i] == 255 ? -1 : (signed char)drop_ntp_port[i];
        L->eligible[i] = L->drop_reason[i] < 0;
        if (L->eligible[i] && (!labelled || L->reply_mode[i] > 7)) {
            PyErr_SetString(PyExc_ValueError, "a first byte not dropped needs a label and a mode");
            goto fail;
        }
    }
    if (need_int(policy, "contract.netgear_port", &v) < 0)
        goto fail;
    L->netgear_port = (int)v;
    /* The global reply budget: a Limit, or None for no cap. */
    if ((value = need(policy, "settings.global_limit")) == NULL)
        goto fail;
    L->has_global = value != Py_None;
    Py_DECREF(value);
    L->global_interval = L->global_tolerance = 0;
    if (L->has_global
            && (need_int(policy, "settings.global_limit.interval_ns", &L->global_interval) < 0
                || need_int(policy, "settings.global_limit.tolerance_ns",
                            &L->global_tolerance) < 0))
        goto fail;
    if (need_int(policy, "contract.record_len", &v) < 0)
        goto fail;
    L->record_len = (Py_ssize_t)v;
    if (L->record_len != RECORD_CELLS) {
        PyErr_Format(PyExc_ValueError, "records have %d items, not %zd", RECORD_CELLS,
                     L->record_len);
        goto fail;
    }
    for (i = 0; i < sizeof(cells) / sizeof(cells[0]); i++) {
        if (need_int(policy, cells[i].path, &v) < 0)
            goto fail;
        if (v < 0 || v >= RECORD_CELLS) {
            PyErr_Format(PyExc_ValueError, "lane policy: %s is outside the record",
                         cells[i].path);
            goto fail;
        }
        *cells[i].slot = (int)v;
    }
    /* crowd.py's constants, and what the policy makes of the estimate */
    if (need_flag(policy, "settings.ttl_classes", &L->ttl_classes) < 0
            || need_int(policy, "settings.max_crowd", &v) < 0)
        goto fail;
    L->max_crowd = (int)v;
    if (need_int(policy, "contract.crowd.sketch_bits", &v) < 0)
        goto fail;
    L->sketch_bits = (int)v;
    if (need_int(policy, "contract.crowd.ewma_shift", &v) < 0)
        goto fail;
    L->ewma_shift = (int)v;
    if (need_int(policy, "contract.crowd.ttl_slack", &L->ttl_slack) < 0
            || need_int(policy, "contract.crowd.class_memory_ns", &L->class_memory_ns) < 0
            || need_int(policy, "contract.crowd.window_ns", &L->crowd_window_ns) < 0
            || need_int(policy, "contract.crowd.irregular_num", &L->irregular_num) < 0
            || need_int(policy, "contract.crowd.irregular_den", &L->irregular_den) < 0)
        goto fail;
    if (L->max_crowd < 1 || L->sketch_bits < 1 || L->sketch_bits > 63 || L->ewma_shift < 0
            || L->ewma_shift > 32 || L->crowd_window_ns <= 0 || L->class_memory_ns < 0
            || L->ttl_slack < 0 || L->irregular_den <= 0 || L->irregular_num < 0) {
        PyErr_SetString(PyExc_ValueError, "crowd settings out of range");
        goto fail;
    }
    for (i = 0; i < 64; i++)
        if (L->crowd_of_bits[i] < 1 || L->crowd_of_bits[i] > L->max_crowd) {
            PyErr_SetString(PyExc_ValueError, "a crowd estimate outside 1..max_crowd");
            goto fail;
        }
    if (need_int(policy, "contract.never", &L->never) < 0
            || need_int(policy, "contract.earliest_ns", &L->earliest_ns) < 0
            || need_int(policy, "contract.latest_ns", &L->latest_ns) < 0
            || need_int(policy, "contract.eviction_scan", &L->eviction_scan) < 0
            || need_int(policy, "settings.prefix_limit.interval_ns", &L->prefix_interval) < 0
            || need_int(policy, "settings.prefix_limit.tolerance_ns", &L->prefix_tolerance) < 0)
        goto fail;
    if (need_int(policy, "settings.v4_prefix_bits", &v) < 0)
        goto fail;
    L->v4_prefix_bits = (int)v;
    if (need_int(policy, "settings.v6_source_bytes", &v) < 0)
        goto fail;
    L->v6_source_bytes = (int)v;
    if (need_int(policy, "settings.v6_prefix_bits", &v) < 0)
        goto fail;
    L->v6_prefix_bits = (int)v;
    if (L->v6_source_bytes < 1 || L->v6_source_bytes > 16 || v < 1 || v > 128) {
        PyErr_SetString(PyExc_ValueError, "lane policy: an IPv6 source key of 1-16 bytes and "
                                          "a prefix of 1-128 bits");
        goto fail;
    }
    if (need_int(policy, "contract.reasons.n_reasons", &v) < 0)
        goto fail;
    L->n_reasons = (int)v;
    L->n_counts = 8 * L->n_reasons;
    for (i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
        if (need_reason(policy, reasons[i].path, L->n_reasons, reasons[i].slot) < 0)
            goto fail;
    for (i = 0; i < sizeof(tail_lengths) / sizeof(tail_lengths[0]); i++) {
        if (need_int(policy, tail_lengths[i].path, &v) < 0)
            goto fail;
        if (v < 4 || v > 65536) {
            PyErr_Format(PyExc_ValueError, "lane policy: %s out of range", tail_lengths[i].path);
            goto fail;
        }
        *tail_lengths[i].slot = (int)v;
    }
    if (L->max_bare_mac < L->min_mac || L->max_mac < L->max_bare_mac
            || L->crypto_nak_len != 4) {   /* (tail_kind compares 4 bytes) */
        PyErr_SetString(PyExc_ValueError, "lane policy: contract.tail is not ordered");
        goto fail;
    }
    if (need_flag(policy, "settings.send_kod", &L->send_kod) < 0
            || need_flag(policy, "objects.enabled", &enabled) < 0
            || need_flag(policy, "objects.verifies_macs", &L->verifies_macs) < 0)
        goto fail;
    L->nts = L->nts_claims != Py_None;
    if (L->nts && (!PyCallable_Check(L->nts_claims) || !PyCallable_Check(L->nts_decide))) {
        PyErr_SetString(PyExc_TypeError, "lane policy: objects.nts_claims and nts_decide "
                                         "must both be callables, or nts_claims None");
        goto fail;
    }
    /* Tables or a ring in Python (the reference model's): the reference decides
     * every packet, and says so (objects.enabled false does the same). */
    L->enabled = enabled && tables_compiled && L->ring != NULL;
    if (Py_SIZE(L->counts) != L->n_counts
            || L->v4_prefix_bits < 1 || L->v4_prefix_bits > 32) {
        PyErr_SetString(PyExc_ValueError, "counts or prefix length out of range");
        goto fail;
    }
    if (!times_fit(L)) {
        PyErr_SetString(PyExc_ValueError, "lane policy: the monotonic range, the limits or "
                                          "the crowd's windows leave room to overflow int64");
        goto fail;
    }
    for (i = 0; i < 256; i++)
        if (L->drop_reason[i] >= L->n_reasons || L->drop_reason_ntp_port[i] >= L->n_reasons) {
            PyErr_SetString(PyExc_ValueError, "a drop reason outside the reasons");
            goto fail;
        }
    L->acl_empty = -1;
    L->configured = 1;
    Py_RETURN_NONE;
fail:
    release_config(L);
    return NULL;
}

/* ------------------------------------------------------------------ receive, send */

static int
receive(Lane *L)
{
    int i, count;
    for (i = 0; i < L->used; i++) {
        L->rh[i].msg_hdr.msg_namelen = L->name_len;
        L->rh[i].msg_hdr.msg_controllen = CONTROL_SPACE;
        L->rh[i].msg_hdr.msg_flags = 0;
    }
    Py_BEGIN_ALLOW_THREADS
    count = recvmmsg(L->fd, L->rh, L->batch, MSG_DONTWAIT | MSG_TRUNC, NULL);
    Py_END_ALLOW_THREADS
    if (count < 0) {
        L->used = 0;
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    }
    L->used = count;
    return count;
}

static int
kernel_receive_ns(struct msghdr *h, int64_t *out)
{
    struct cmsghdr *c;
    for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS
                && c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof(ts));
            *out = (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
            return 1;
        }
    return 0;
}

/* The IP TTL (IPv4, IPv4-mapped) or hop limit (IPv6) the datagram came with; -1 if the
 * socket did not ask for it (IP_RECVTTL / IPV6_RECVHOPLIMIT, set where the server's
 * sockets are made). */
static int
arrival_ttl(struct msghdr *h)
{
    struct cmsghdr *c;
    for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c))
        if (((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TTL)
                || (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_HOPLIMIT))
                && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int ttl;
            memcpy(&ttl, CMSG_DATA(c), sizeof(ttl));
            return ttl >= 0 && ttl <= 255 ? ttl : -1;
        }
    return -1;
}

static Py_ssize_t
message_bytes(Lane *L, int q)
{
    struct msghdr *h = &L->sh[q].msg_hdr;
    return (Py_ssize_t)L->siov[2 * q].iov_len + (h->msg_iovlen == 2 ? 8 : 0);
}

/* A reply copied into slot q: a 48-byte time reply in the time layout (40 bytes
 * from the slot, the chunk's transmit stamp from xmt), anything else whole. */
static void
lay_out(Lane *L, int q, int time_layout, Py_ssize_t size)
{
    L->siov[2 * q].iov_len = time_layout ? BEFORE_TRANSMIT : (size_t)size;
    L->sh[q].msg_hdr.msg_iovlen = time_layout ? 2 : 1;
}

static int
stamp(Lane *L, PyObject *transmit)
{
    PyObject *xmt = PyObject_CallNoArgs(transmit);
    if (xmt == NULL)
        return -1;
    if (!PyBytes_Check(xmt) || PyBytes_GET_SIZE(xmt) != 8) {
        Py_DECREF(xmt);
        PyErr_SetString(PyExc_TypeError, "transmit() must return 8 bytes");
        return -1;
    }
    memcpy(L->xmt, PyBytes_AS_STRING(xmt), 8);
    Py_DECREF(xmt);
    return 0;
}

/* Stamp, sign and sendmmsg the queued replies in chunks of STAMP_EVERY. */
static int
flush(Lane *L, int queued, PyObject *transmit, int64_t *bytes_out, int64_t *failed)
{
    int start, q;
    for (start = 0; start < queued; start += STAMP_EVERY) {
        int end = start + STAMP_EVERY < queued ? start + STAMP_EVERY : queued;
        int needs_stamp = 0, s, retries = 3;
        for (q = start; q < end; q++)
            needs_stamp |= L->queue[q].is_time;
        if (needs_stamp && stamp(L, transmit) < 0)
            return -1;
        for (q = start; q < end; q++) {
            Queued *e = &L->queue[q];
            PyObject *final;
            Py_ssize_t size;
            if (e->kind != Q_DEFERRED)
                continue;
            if (e->is_time) {   /* stamped, then signed: the MAC covers the stamp */
                size = PyBytes_GET_SIZE(e->reply);
                final = PyBytes_FromStringAndSize(PyBytes_AS_STRING(e->reply), size);
                if (final == NULL)
                    return -1;
                memcpy(PyBytes_AS_STRING(final) + BEFORE_TRANSMIT, L->xmt, 8);
            } else {
                final = e->reply;
                Py_INCREF(final);
            }
            if (e->signer != NULL) {
                PyObject *signed_reply = PyObject_CallOneArg(e->signer, final);
                Py_DECREF(final);
                if (signed_reply == NULL)
                    return -1;
                final = signed_reply;
            }
            if (!PyBytes_Check(final) || PyBytes_GET_SIZE(final) > L->slot) {
                Py_DECREF(final);
                e->kind = Q_SKIP;    /* cannot happen: a reply is never longer than its request */
                (*failed)++;
                continue;
            }
            size = PyBytes_GET_SIZE(final);
            memcpy(L->out + (size_t)q * L->slot, PyBytes_AS_STRING(final), size);
            Py_DECREF(final);
            lay_out(L, q, 0, size);
            *bytes_out += size;
        }
        s = start;
        while (s < end) {
            int e = s, sent;
            if (L->queue[s].kind == Q_SKIP) {
                s++;
                continue;
            }
            while (e < end && L->queue[e].kind != Q_SKIP)
                e++;
            Py_BEGIN_ALLOW_THREADS
            sent = sendmmsg(L->fd, L->sh + s, e - s, 0);
            Py_END_ALLOW_THREADS
            if (sent > 0) {
                s += sent;
                continue;
            }
            if (sent < 0 && errno == EINTR && retries-- > 0)
                continue;
            /* The message at s failed: count it, skip it, send the rest. */
            (*failed)++;
            *bytes_out -= message_bytes(L, s);
            s++;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ one datagram */

/* Datagram i's source address as packed bytes (an IPv4-mapped IPv6 source as
 * its 4 IPv4 bytes); returns their length. */
static inline int
source_of(Lane *L, int i, const unsigned char **packed)
{
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const unsigned char *name = L->names + i * L->name_stride;
    if (!L->v6) {
        *packed = name + 4;
        return 4;
    }
    if (memcmp(name + 8, mapped, 12) == 0) {
        *packed = name + 20;
        return 4;
    }
    *packed = name + 8;
    return 16;
}

/* Bring a batch's index slots, then its records, into cache before deciding any
 * of them, so that their cache and TLB misses overlap instead of queueing one
 * behind another (a million-source table is far larger than the caches). Only
 * hints: handle() looks everything up again. */
static void
prefetch(Lane *L, int count)
{
    AddressTable *sources = SOURCE_TABLE(L), *prefixes = PREFIX_TABLE(L);
    /* A full table: first sightings look the ring up (a flood's every packet). */
    NewcomerRing *ring = L->ring != NULL && sources->count >= L->max_sources
                         ? (NewcomerRing *)L->ring : NULL;
    const unsigned char *packed;
    int i, pass;
    if (ring != NULL)   /* the keys the next newcomers will make the ring forget */
        for (i = 0; i < count; i++) {
            Key old = ring->ring[(ring->next + i) % ring->max_entries];
            if (old.length != 0)
                __builtin_prefetch(&ring->slots[index_hash(old) & ring->mask]);
        }
    for (pass = 0; pass < 2; pass++)
        for (i = 0; i < count; i++) {
            const unsigned char *head = L->heads + i * HEAD;
            PyObject *found;
            int packed_len;
            if (L->rh[i].msg_len != HEAD || !L->eligible[head[0]])
                continue;
            packed_len = source_of(L, i, &packed);
            if (pass == 0) {
                Key k = source_key(L, packed, packed_len);
                __builtin_prefetch(table_home(sources, k));
                __builtin_prefetch(table_home(prefixes, prefix_key(L, packed, packed_len)));
                if (ring != NULL)
                    __builtin_prefetch(&ring->slots[index_hash(k) & ring->mask]);
                continue;
            }
            if ((found = table_find(sources, source_key(L, packed, packed_len))) != NULL) {
                __builtin_prefetch(found);
                __builtin_prefetch((const char *)found + 64);
            }
            if ((found = table_find(prefixes, prefix_key(L, packed, packed_len))) != NULL)
                __builtin_prefetch(found);
        }
}

/* Decide datagram i of the batch and queue its reply at queue[*queued]. */
static int
handle(Lane *L, int i, int64_t now_ns, PyObject *wall_ns, int *queued,
       int64_t *bytes_in, int64_t *bytes_out, int64_t *truncated, int64_t *send_errors)
{
    struct msghdr *h = &L->rh[i].msg_hdr;
    unsigned char *head = L->heads + i * HEAD, *name = L->names + i * L->name_stride;
    unsigned char *slot_out = L->out + (size_t)(*queued) * L->slot;
    const unsigned char *packed;
    Py_ssize_t length = L->rh[i].msg_len;
    int packed_len, port, reason, reply_kind, decided = 0, q = *queued, is_time, ttl;
    int64_t recv_ns;
    PyObject *data, *result, *reply, *signer;
    Queued *e = &L->queue[q];

    if (length > L->slot) {
        (*truncated)++;
        *bytes_in += L->slot;
        length = -1;    /* passed on empty: counted as malformed by the sanity stage */
    } else
        *bytes_in += length;
    port = (name[2] << 8) | name[3];
    packed_len = source_of(L, i, &packed);
    ttl = arrival_ttl(h);
    if (!kernel_receive_ns(h, &recv_ns)) {
        PyObject *wall = PyObject_CallNoArgs(wall_ns);
        if (wall == NULL)
            return -1;
        if (!as_i64(wall, &recv_ns)) {
            Py_DECREF(wall);
            PyErr_SetString(PyExc_TypeError, "wall_ns() must return an int");
            return -1;
        }
        Py_DECREF(wall);
    }
    if (L->enabled) {
        decided = length == HEAD
            ? fast_decide(L, head, MAC_NONE, 0, packed, packed_len, port, ttl, recv_ns, now_ns,
                          slot_out, &reason, &reply_kind)
            : decide_longer(L, head, L->tails + (size_t)i * (L->slot - HEAD), length, packed,
                            packed_len, port, ttl, recv_ns, now_ns, slot_out, &reason,
                            &reply_kind);
        Py_CLEAR(L->datagram);
        if (decided <= 0 || reply_kind == REPLY_NONE)
            Py_CLEAR(L->signer);   /* (a drop: no reply to sign) */
        if (decided < 0)
            return -1;
    }
    if (decided && L->signer != NULL) {   /* stamped, then signed, when its chunk is sent */
        L->sh[q].msg_hdr.msg_name = name;
        e->is_time = reply_kind == REPLY_TIME;
        e->kind = Q_DEFERRED;
        if ((e->reply = PyBytes_FromStringAndSize((const char *)slot_out, HEAD)) == NULL) {
            Py_CLEAR(L->signer);
            return -1;
        }
        e->signer = L->signer;   /* the queue's reference now */
        L->signer = NULL;
        (*queued)++;
        return 0;
    }
    if (decided) {
        if (reply_kind != REPLY_NONE) {
            L->sh[q].msg_hdr.msg_name = name;
            e->is_time = reply_kind == REPLY_TIME;
            e->kind = e->is_time ? Q_TIME : Q_PLAIN;
            lay_out(L, q, e->is_time, HEAD);
            *bytes_out += HEAD;
            (*queued)++;
        }
        return 0;
    }

    if (length < 0)
        data = PyBytes_FromStringAndSize(NULL, 0);
    else {
        data = PyBytes_FromStringAndSize(NULL, length);
        if (data != NULL) {
            memcpy(PyBytes_AS_STRING(data), head, length < HEAD ? length : HEAD);
            if (length > HEAD)
                memcpy(PyBytes_AS_STRING(data) + HEAD,
                       L->tails + (size_t)i * (L->slot - HEAD), length - HEAD);
        }
    }
    if (data == NULL)
        return -1;
    result = slow_decide(L, data, packed, packed_len, port, ttl, recv_ns, now_ns);
    Py_DECREF(data);
    if (result == NULL)
        return -1;
    reason = (int)PyLong_AsLong(PyTuple_GET_ITEM(result, 0));
    reply = PyTuple_GET_ITEM(result, 1);
    signer = PyTuple_GET_ITEM(result, 2);
    if (reason == -1 && PyErr_Occurred()) {
        Py_DECREF(result);
        return -1;
    }
    if (reply == Py_None) {
        Py_DECREF(result);
        return 0;
    }
    if (!PyBytes_Check(reply)) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_TypeError, "decide's reply must be bytes or None");
        return -1;
    }
    is_time = reason <= L->last_time_reason;
    length = PyBytes_GET_SIZE(reply);
    if (length > L->slot) {   /* cannot happen: a reply is never longer than its request */
        (*send_errors)++;
        Py_DECREF(result);
        return 0;
    }
    L->sh[q].msg_hdr.msg_name = name;
    e->is_time = is_time;
    if (signer == Py_None && (!is_time || length == HEAD)) {
        memcpy(slot_out, PyBytes_AS_STRING(reply), length);
        e->kind = is_time ? Q_TIME : Q_PLAIN;
        lay_out(L, q, is_time, length);
        *bytes_out += length;
    } else {   /* stamped (then signed) when its chunk is sent */
        e->kind = Q_DEFERRED;
        Py_INCREF(reply);
        e->reply = reply;
        if (signer != Py_None) {
            Py_INCREF(signer);
            e->signer = signer;
        }
    }
    Py_DECREF(result);
    (*queued)++;
    return 0;
}

/* ------------------------------------------------------------------ waiting */

#define MAX_WATCHED 64
#define QUIET_NS 1000000LL   /* publish before waiting longer than this */

enum { WAIT_TIMEOUT, WAIT_DATA, WAIT_OTHER };

/*
 * Wait, without the GIL, until this socket has a datagram (WAIT_DATA), until
 * until_ns passes (WAIT_TIMEOUT), or until Python is needed (WAIT_OTHER): one of
 * the other descriptors the server's loop watches is readable, or a signal
 * arrived (EINTR; the signal wake-up descriptor is among the watched).
 */
static int
wait_readable(Lane *L, int64_t until_ns, struct pollfd *fds, int nfds)
{
    int64_t now = monotonic_ns();
    int rc, i;
    if (until_ns <= now)
        return WAIT_TIMEOUT;
    fds[0].fd = L->fd;
    for (i = 0; i < nfds; i++) {
        fds[i].events = POLLIN;
        fds[i].revents = 0;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = poll(fds, nfds, (int)((until_ns - now + 999999) / 1000000));
    Py_END_ALLOW_THREADS
    if (rc == 0)
        return WAIT_TIMEOUT;
    if (rc < 0)
        return WAIT_OTHER;
    for (i = 1; i < nfds; i++)
        if (fds[i].revents)
            return WAIT_OTHER;
    return (fds[0].revents & (POLLIN | POLLERR)) ? WAIT_DATA : WAIT_OTHER;
}

/* Hand Python what the loop tallies itself (the metrics are scraped from
 * another thread): publish(truncated, send_errors, bytes_in, bytes_out). The
 * packet counts, by reason and by label, need nothing: they are counted in
 * Python's own Counts. */
static int
publish_counted(PyObject *publish, int64_t *truncated, int64_t *send_errors,
                int64_t *bytes_in, int64_t *bytes_out)
{
    PyObject *result;
    if (publish == Py_None
            || (*truncated == 0 && *send_errors == 0 && *bytes_in == 0 && *bytes_out == 0))
        return 0;
    result = PyObject_CallFunction(publish, "LLLL", (long long)*truncated,
                                   (long long)*send_errors, (long long)*bytes_in,
                                   (long long)*bytes_out);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    *truncated = *send_errors = *bytes_in = *bytes_out = 0;
    return 0;
}

/*
 * The socket is empty: wait here rather than in the Python event loop, where
 * a wake-up costs several microseconds of interpreter time, most of it wasted
 * below saturation when each wake-up finds a request or two. Returns 1 to
 * receive again, 0 to return to Python, -1 on error.
 *
 * Under steady traffic the next request comes within microseconds, so first
 * wait up to QUIET_NS without publishing; only a longer lull pays for
 * publishing (a Python call) before the long wait. The byte and send-error
 * tallies Python sees are thus behind by at most a pump's budget of requests
 * or one QUIET_NS lull (the packet counts are never behind).
 */
static int
wait_for_more(Lane *L, int64_t until_ns, struct pollfd *fds, int nfds, PyObject *publish,
              int64_t *truncated, int64_t *send_errors, int64_t *bytes_in, int64_t *bytes_out)
{
    int64_t quiet_until = monotonic_ns() + QUIET_NS;
    int waited = wait_readable(L, quiet_until < until_ns ? quiet_until : until_ns, fds, nfds);
    if (waited == WAIT_TIMEOUT && quiet_until < until_ns) {
        if (publish_counted(publish, truncated, send_errors, bytes_in, bytes_out) < 0)
            return -1;
        waited = wait_readable(L, until_ns, fds, nfds);
    }
    return waited == WAIT_DATA;
}

/* ------------------------------------------------------------------ methods */

static PyObject *
Lane_pump(Lane *L, PyObject *args)
{
    PyObject *wall_ns, *transmit, *watch = NULL, *publish = Py_None;
    long budget;
    long long wait_until_ns = 0;
    int64_t handled = 0, truncated = 0, send_errors = 0, bytes_in = 0, bytes_out = 0;
    int errors_left, count = 0, queued = 0, i, failed = 0, nfds = 1;
    struct pollfd fds[MAX_WATCHED + 1];
    if (!PyArg_ParseTuple(args, "OOl|LOO", &wall_ns, &transmit, &budget, &wait_until_ns,
                          &watch, &publish))
        return NULL;
    if (watch != NULL && watch != Py_None) {
        Py_ssize_t n;
        if (!PyTuple_Check(watch)) {
            PyErr_SetString(PyExc_TypeError, "watch must be a tuple of descriptors");
            return NULL;
        }
        n = PyTuple_GET_SIZE(watch);
        if (n > MAX_WATCHED)
            wait_until_ns = 0;   /* too many to watch here: the Python loop waits */
        for (i = 0; i < n && i < MAX_WATCHED; i++) {
            long fd = PyLong_AsLong(PyTuple_GET_ITEM(watch, i));
            if (fd == -1 && PyErr_Occurred())
                return NULL;
            if (fd < 0 || fd > INT32_MAX) {
                PyErr_SetString(PyExc_ValueError, "a watched descriptor out of range");
                return NULL;
            }
            fds[nfds++].fd = (int)fd;
        }
    }
    if (begin(L) < 0)
        return NULL;
    errors_left = L->batch;
    while (handled < budget) {
        int64_t now_ns;
        count = receive(L);
        if (count < 0 && errors_left-- > 0)
            continue;   /* ICMP errors surface here on some kernels; go on */
        if (count == 0 && wait_until_ns > 0) {
            int more = wait_for_more(L, wait_until_ns, fds, nfds, publish, &truncated,
                                     &send_errors, &bytes_in, &bytes_out);
            if (more < 0)
                failed = 1;
            if (more > 0)
                continue;
        }
        if (count <= 0)
            break;
        now_ns = monotonic_ns();
        queued = 0;
        if (L->enabled)
            prefetch(L, count);
        for (i = 0; i < count; i++)
            if (handle(L, i, now_ns, wall_ns, &queued, &bytes_in, &bytes_out,
                       &truncated, &send_errors) < 0) {
                failed = 1;
                break;
            }
        if (failed)
            break;
        handled += count;
        if (queued && flush(L, queued, transmit, &bytes_out, &send_errors) < 0) {
            failed = 1;
            break;
        }
        release_queue(L, queued);
        queued = 0;
        if (count < L->batch) {   /* the queue is (very probably) empty: no EAGAIN call */
            int more;
            if (wait_until_ns <= 0 || handled >= budget)
                break;
            more = wait_for_more(L, wait_until_ns, fds, nfds, publish, &truncated,
                                 &send_errors, &bytes_in, &bytes_out);
            if (more < 0)
                failed = 1;
            if (more <= 0)
                break;
        }
        if (wait_until_ns > 0 && now_ns >= wait_until_ns)
            break;
    }
    release_queue(L, queued);
    if (failed || PyErr_Occurred())
        return NULL;
    return Py_BuildValue("LLLLL", (long long)handled, (long long)truncated,
                         (long long)send_errors, (long long)bytes_in, (long long)bytes_out);
}

/* decide_one(data, packed, port, recv_ns, now_ns, ttl=-1) -> (reason, reply, signer, fast):
 * one datagram through the same decision as pump, without sockets (tests). */
static PyObject *
Lane_decide_one(Lane *L, PyObject *args)
{
    Py_buffer data, packed;
    int port, reason = 0, reply_kind = REPLY_NONE, decided = 0, ttl = -1;
    long long recv_ns, now_ns;
    unsigned char reply[HEAD];
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*iLL|i", &data, &packed, &port, &recv_ns, &now_ns, &ttl))
        return NULL;
    if (port < 0 || port > 65535 || (packed.len != 4 && packed.len != 16)
            || ttl < -1 || ttl > 255) {
        PyErr_SetString(PyExc_ValueError,
                        "port 0-65535, a 4- or 16-byte address and a TTL -1..255");
        goto done;
    }
    if (begin(L) < 0)
        goto done;
    if (L->enabled)
        decided = data.len == HEAD
            ? fast_decide(L, data.buf, MAC_NONE, 0, packed.buf, (int)packed.len, port, ttl,
                          recv_ns, now_ns, reply, &reason, &reply_kind)
            : decide_longer(L, data.buf, (const unsigned char *)data.buf + HEAD, data.len,
                            packed.buf, (int)packed.len, port, ttl, recv_ns, now_ns, reply,
                            &reason, &reply_kind);
    Py_CLEAR(L->datagram);
    if (decided <= 0 || reply_kind == REPLY_NONE)
        Py_CLEAR(L->signer);
    if (decided < 0)
        goto done;
    if (decided) {
        if (reply_kind == REPLY_TIME)
            memcpy(reply + BEFORE_TRANSMIT, reply + 32, 8);   /* transmit = receive */
        if (reply_kind != REPLY_NONE)
            result = Py_BuildValue("iy#OO", reason, reply, (Py_ssize_t)HEAD,
                                   L->signer != NULL ? L->signer : Py_None, Py_True);
        else
            result = Py_BuildValue("iOOO", reason, Py_None, Py_None, Py_True);
        Py_CLEAR(L->signer);
    } else {
        PyObject *bytes = PyBytes_FromStringAndSize(data.buf, data.len), *slow;
        if (bytes == NULL)
            goto done;
        slow = slow_decide(L, bytes, packed.buf, (int)packed.len, port, ttl, recv_ns, now_ns);
        Py_DECREF(bytes);
        if (slow == NULL)
            goto done;
        result = Py_BuildValue("OOOO", PyTuple_GET_ITEM(slow, 0), PyTuple_GET_ITEM(slow, 1),
                               PyTuple_GET_ITEM(slow, 2), Py_False);
        Py_DECREF(slow);
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&packed);
    return result;
}

static PyObject *
Lane_get_fast_decisions(Lane *L, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(L->fast_decisions);
}

static PyMethodDef Lane_methods[] = {
    {"configure", (PyCFunction)Lane_configure, METH_O,
     "Take the pipeline's lane policy (Pipeline.lane_policy(), guardntp/filter/lane.py)."},
    {"pump", (PyCFunction)Lane_pump, METH_VARARGS,
     "pump(wall_ns, transmit, budget, wait_until_ns=0, watch=(), publish=None) -> "
     "(handled, truncated, send_errors, bytes_in, bytes_out); waits for datagrams until "
     "wait_until_ns (monotonic) unless a watched descriptor becomes readable, first "
     "passing what it counted so far to publish(truncated, send_errors, bytes_in, "
     "bytes_out); returns what it has not passed on"},
    {"decide_one", (PyCFunction)Lane_decide_one, METH_VARARGS,
     "decide_one(data, packed, port, recv_ns, now_ns, ttl=-1) -> (reason, reply, signer, fast)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Lane_get_first_sightings(Lane *L, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(L->first_sightings);
}

static PyObject *
Lane_get_promotions(Lane *L, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(L->promotions);
}

static PyGetSetDef Lane_getset[] = {
    {"fast_decisions", (getter)Lane_get_fast_decisions, NULL,
     "time replies decided in C so far", NULL},
    {"first_sightings", (getter)Lane_get_first_sightings, NULL,
     "requests from sources not in the source table decided in C so far", NULL},
    {"promotions", (getter)Lane_get_promotions, NULL,
     "of those, newcomers promoted into the source table", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guardntp._fastlane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "recvmmsg -> decide -> sendmmsg for one UDP socket (guardntp/fastlane.py)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

static PyMethodDef module_methods[] = {
    {"longest_match", longest_match, METH_VARARGS,
     "longest_match(probes, block, packed, now_ns): the compiled AccessList.lookup over "
     "the configuration's probes (AccessList.probes(width)) and the blocklist's BlockTable "
     "(or None): the active entry with the longest prefix covering packed, the "
     "BlockTable's on a tie (its reference model: guardntp.filter.acl.longest_match)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "guardntp._fastlane",
    "The compiled packet loop (see guardntp/fastlane.py).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__fastlane(void)
{
    PyObject *m;
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&RecordType) < 0
            || PyType_Ready(&CountsType) < 0
            || PyType_Ready(&AddressTableType) < 0 || PyType_Ready(&TableIteratorType) < 0
            || PyType_Ready(&NewcomerRingType) < 0 || PyType_Ready(&BlockTableType) < 0)
        return NULL;
    str_action = PyUnicode_InternFromString("action");
    str_expires_ns = PyUnicode_InternFromString("expires_ns");
    str_origin = PyUnicode_InternFromString("origin");
    str_evictions = PyUnicode_InternFromString("evictions");
    str_admissions_refused = PyUnicode_InternFromString("admissions_refused");
    str_table_full = PyUnicode_InternFromString("table_full");
    long_zero = PyLong_FromLong(0);
    long_one = PyLong_FromLong(1);
    if (str_action == NULL || str_expires_ns == NULL || str_origin == NULL
            || str_evictions == NULL
            || str_admissions_refused == NULL || str_table_full == NULL || long_zero == NULL
            || long_one == NULL)
        return NULL;
    if (getrandom(&index_seed, sizeof(index_seed), GRND_NONBLOCK) != sizeof(index_seed))
        index_seed = (uint64_t)monotonic_ns() * 0x9E3779B97F4A7C15ULL;   /* early boot only */
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(m, "Record", (PyObject *)&RecordType) < 0) {
        Py_DECREF(&RecordType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CountsType);
    if (PyModule_AddObject(m, "Counts", (PyObject *)&CountsType) < 0) {
        Py_DECREF(&CountsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AddressTableType);
    if (PyModule_AddObject(m, "AddressTable", (PyObject *)&AddressTableType) < 0) {
        Py_DECREF(&AddressTableType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&NewcomerRingType);
    if (PyModule_AddObject(m, "NewcomerRing", (PyObject *)&NewcomerRingType) < 0) {
        Py_DECREF(&NewcomerRingType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BlockTableType);
    if (PyModule_AddObject(m, "BlockTable", (PyObject *)&BlockTableType) < 0) {
        Py_DECREF(&BlockTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
