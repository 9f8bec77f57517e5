/* The two per-line loops of core/jsonl_validation.py in C, which were most of its time in Python.
 *
 * object_lines(buf, start, stop): the number of lines of buf[start:stop] (which ends with a newline)
 * when every one starts with "{" and ends with "}" (or "}" and CR), else -1: the condition under which
 * the validator trusts one decode_lines call with the whole region (_read_region says why). memchr
 * from line to line; the Python loop cost ~0.45 us a line.
 *
 * first_deep_line(buf, start, stop, limit): where the first line of buf[start:stop] starts whose arrays and
 * objects nest more than `limit` deep (the line's own object is level 1), or -1: the validator's nesting
 * limit, one call a region. A line holding at most `limit` "[" and "{" bytes cannot nest deeper, and
 * counting them is a vector loop (SSE2: ~16 bytes a cycle); only a line with more is walked byte by byte
 * (outside strings, an escape skipping the byte after it), which real lines almost never need.
 *
 * CustomIdIndex: the custom_id index, the same 12 bytes an id as the Python one, without its per-id cost.
 *
 * An upload's validator asks, for every request line, "was this custom_id seen before, and on which
 * line?". The pure-Python index (_CustomIdIndex there: 4096 sorted array.arrays, bisect, insert) spent
 * ~0.6 us an id in the interpreter, over a third of validating a 200 MiB file. This is the same
 * structure: the low 12 bits of the id's hash() pick one of 4096 sorted arrays; the id is kept there as
 * one 64-bit word, hash() with those 12 bits replaced by 12 bits of a second hash; beside it, its line
 * (32 bits). A false duplicate needs a 76-bit collision, hash() being SipHash keyed per process. The
 * second hash is FNV-1a over the string's canonical code units, seeded by the caller at random (it
 * only adds bits to a keyed hash, so it need not be keyed itself).
 *
 * The word also holds the id's length (xored in above the bucket bits): hash() hashes a string's
 * canonical bytes, not its code points, so two different strings of different kinds but the same
 * bytes ("ab" and U+6261, "\xff\xff" and U+FFFF) have equal hash() whatever the key, and the FNV
 * over the same bytes is equal too. Such strings always differ in length (same bytes, different
 * bytes a code point), so the length tells them apart for certain.
 *
 *     index = CustomIdIndex(seed)
 *     index.add(custom_id, line) -> the line it first appeared on, or 0 (now added)
 *     index.add_run(custom_ids, first_line) -> [(line, custom_id, its first line), ...] of the
 *         duplicates among the ids of lines first_line, first_line + 1, ... (in line order)
 *
 * Lines are 1-based and below 2**32 (OverflowError past that; the Python index takes such files).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BUCKET_BITS 12
#define BUCKET_COUNT (1u << BUCKET_BITS)
#define BUCKET_MASK ((uint64_t)BUCKET_COUNT - 1)

typedef struct {
    int64_t *words;   /* sorted */
    uint32_t *lines;  /* lines[i] is the line of words[i] */
    Py_ssize_t len;
    Py_ssize_t cap;
} Bucket;

typedef struct {
    PyObject_HEAD
    Bucket *buckets;  /* BUCKET_COUNT of them */
    uint64_t seed;
    Py_ssize_t count; /* ids held */
} Index;

static uint64_t
second_hash(PyObject *text, uint64_t seed)
{
    /* FNV-1a, 64-bit, over the code units (equal strings have equal kind and data), then the
     * splitmix64 finalizer so that every bit of the result depends on every byte. */
    const unsigned char *data = (const unsigned char *)PyUnicode_DATA(text);
    Py_ssize_t size = PyUnicode_GET_LENGTH(text) * PyUnicode_KIND(text);
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (Py_ssize_t i = 0; i < size; i++) {
        h ^= data[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

/* The line `text` first appeared on (0: it is new and now held as line `line`); -1 with an exception set. */
static int64_t
index_add(Index *self, PyObject *text, uint32_t line)
{
    /* Exactly str: a subclass's __hash__ could run Python code (and change the list being read). */
    if (!PyUnicode_CheckExact(text)) {
        PyErr_Format(PyExc_TypeError, "a custom_id must be a str, not %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
    if (PyUnicode_READY(text) < 0) {
        return -1;
    }
    Py_hash_t key = PyObject_Hash(text);
    if (key == -1 && PyErr_Occurred()) {
        return -1;
    }
    uint64_t bits = (uint64_t)key;
    Bucket *bucket = &self->buckets[bits & BUCKET_MASK];
    uint64_t length = (uint64_t)PyUnicode_GET_LENGTH(text) << BUCKET_BITS;
    int64_t word = (int64_t)(((bits ^ length) & ~BUCKET_MASK) | (second_hash(text, self->seed) & BUCKET_MASK));
    /* The first position whose word is >= word. */
    Py_ssize_t lo = 0, hi = bucket->len;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (bucket->words[mid] < word) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    if (lo < bucket->len && bucket->words[lo] == word) {
        return bucket->lines[lo];
    }
    if (bucket->len == bucket->cap) {
        Py_ssize_t cap = bucket->cap < 8 ? 8 : bucket->cap + bucket->cap / 2;
        int64_t *words = PyMem_Realloc(bucket->words, (size_t)cap * sizeof(int64_t));
        if (words == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        bucket->words = words;
        uint32_t *lines = PyMem_Realloc(bucket->lines, (size_t)cap * sizeof(uint32_t));
        if (lines == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        bucket->lines = lines;
        bucket->cap = cap;
    }
    Py_ssize_t after = bucket->len - lo;
    memmove(bucket->words + lo + 1, bucket->words + lo, (size_t)after * sizeof(int64_t));
    memmove(bucket->lines + lo + 1, bucket->lines + lo, (size_t)after * sizeof(uint32_t));
    bucket->words[lo] = word;
    bucket->lines[lo] = line;
    bucket->len++;
    self->count++;
    return 0;
}

static int
line_number(PyObject *value, Py_ssize_t ahead, uint32_t *out)
{
    /* `value` as a line, and `ahead` lines after it still a line: 1 <= value, value + ahead < 2**32
     * (compared without the sum, which wraps for a value near 2**64). */
    unsigned long long line = PyLong_AsUnsignedLongLong(value);
    if (line == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (line == 0 || line > UINT32_MAX || (unsigned long long)ahead > UINT32_MAX - line) {
        PyErr_SetString(PyExc_OverflowError, "lines must be from 1 to 2**32 - 1");
        return -1;
    }
    *out = (uint32_t)line;
    return 0;
}

static PyObject *
Index_add(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t line;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(custom_id, line)");
        return NULL;
    }
    if (line_number(args[1], 0, &line) < 0) {
        return NULL;
    }
    int64_t first = index_add(self, args[0], line);
    return first < 0 ? NULL : PyLong_FromLongLong(first);
}

static PyObject *
Index_add_run(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t first_line;
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "add_run(custom_ids: list, first_line)");
        return NULL;
    }
    PyObject *ids = args[0];
    Py_ssize_t count = PyList_GET_SIZE(ids);
    if (line_number(args[1], count, &first_line) < 0) {
        return NULL;
    }
    PyObject *duplicates = PyList_New(0);
    if (duplicates == NULL) {
        return NULL;
    }
    /* str hashes are C, but the tuples built for duplicates can start a garbage collection, whose
     * finalizers run Python code that may change the list: each id is held while it is used, and
     * the loop stops at the list's end or at `count`, the lines line_number checked. */
    for (Py_ssize_t i = 0; i < count && i < PyList_GET_SIZE(ids); i++) {
        PyObject *text = PyList_GET_ITEM(ids, i);
        Py_INCREF(text);
        int64_t first = index_add(self, text, first_line + (uint32_t)i);
        PyObject *found = NULL;
        if (first > 0) {
            found = Py_BuildValue("(nOL)", (Py_ssize_t)first_line + i, text, (long long)first);
        }
        Py_DECREF(text);
        if (first < 0 || (first > 0 && (found == NULL || PyList_Append(duplicates, found) < 0))) {
            Py_XDECREF(found);
            Py_DECREF(duplicates);
            return NULL;
        }
        Py_XDECREF(found);
    }
    return duplicates;
}

static PyObject *
object_lines(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "y*nn:object_lines", &buf, &start, &stop)) {
        return NULL;
    }
    if (start < 0 || stop > buf.len || start >= stop) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "object_lines: start and stop must bound a non-empty part of buf");
        return NULL;
    }
    const char *data = (const char *)buf.buf;
    Py_ssize_t lines = 0;
    if (data[stop - 1] != '\n') {
        lines = -1;
    }
    for (Py_ssize_t i = start; lines >= 0 && i < stop;) {
        const char *end = memchr(data + i, '\n', (size_t)(stop - i));  /* found: data[stop - 1] is one */
        Py_ssize_t j = end - data;
        /* j > i once data[i] is "{": the "}" looked for lies at j - 1, or j - 2 before a CR. */
        if (data[i] != '{' || !(data[j - 1] == '}' || (data[j - 1] == '\r' && j - 2 > i && data[j - 2] == '}'))) {
            lines = -1;
            break;
        }
        lines++;
        i = j + 1;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(lines);
}

/* The "[" and "{" bytes of data[0:size] ("[" is "{" with bit 0x20 clear, and no other byte is either
 * once that bit is set). */
static Py_ssize_t
count_openers(const unsigned char *data, Py_ssize_t size)
{
    Py_ssize_t count = 0, i = 0;
#if defined(__SSE2__)
    const __m128i bit = _mm_set1_epi8(0x20), brace = _mm_set1_epi8('{'), zero = _mm_setzero_si128();
#define OPENERS_AT(at) _mm_cmpeq_epi8(_mm_or_si128(_mm_loadu_si128((const __m128i *)(data + (at))), bit), brace)
    while (size - i >= 64) {
        /* 64 bytes a round into two sets of byte counters (each compare adds 1 as a -1 subtracted, two a
         * round to each set): at most 127 rounds before they are summed. */
        __m128i even = zero, odd = zero;
        Py_ssize_t rounds = (size - i) / 64;
        if (rounds > 127) {
            rounds = 127;
        }
        for (Py_ssize_t r = 0; r < rounds; r++, i += 64) {
            even = _mm_sub_epi8(_mm_sub_epi8(even, OPENERS_AT(i)), OPENERS_AT(i + 32));
            odd = _mm_sub_epi8(_mm_sub_epi8(odd, OPENERS_AT(i + 16)), OPENERS_AT(i + 48));
        }
        __m128i sums = _mm_add_epi64(_mm_sad_epu8(even, zero), _mm_sad_epu8(odd, zero));
        count += _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_unpackhi_epi64(sums, sums));
    }
    for (; size - i >= 16; i += 16) {
        count += __builtin_popcount((unsigned)_mm_movemask_epi8(OPENERS_AT(i)));
    }
#undef OPENERS_AT
#endif
    for (; i < size; i++) {
        count += (data[i] | 0x20) == '{';
    }
    return count;
}

/* Whether the arrays and objects of data[0:size] (one line) nest more than `limit` deep. */
static int
nests_deeper(const unsigned char *data, Py_ssize_t size, Py_ssize_t limit)
{
    Py_ssize_t depth = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = data[i];
        if (c == '"') {
            for (i++; i < size && data[i] != '"'; i++) {
                if (data[i] == '\\') {
                    i++;
                }
            }
        } else if (c == '[' || c == '{') {
            if (++depth > limit) {
                return 1;
            }
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return 0;
}

static PyObject *
first_deep_line(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t start, stop, limit;
    if (!PyArg_ParseTuple(args, "y*nnn:first_deep_line", &buf, &start, &stop, &limit)) {
        return NULL;
    }
    if (start < 0 || stop > buf.len || start > stop || limit < 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "first_deep_line: start and stop must bound a part of buf, limit >= 0");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)buf.buf;
    Py_ssize_t found = -1;
    for (Py_ssize_t i = start; i < stop;) {
        const unsigned char *end = memchr(data + i, '\n', (size_t)(stop - i));
        Py_ssize_t j = end == NULL ? stop : end - data;
        if (count_openers(data + i, j - i) > limit && nests_deeper(data + i, j - i, limit)) {
            found = i;
            break;
        }
        i = j + 1;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef module_functions[] = {
    {"object_lines", object_lines, METH_VARARGS,
     "object_lines(buf, start, stop) -> the lines of buf[start:stop] when each is {...}, else -1"},
    {"first_deep_line", first_deep_line, METH_VARARGS,
     "first_deep_line(buf, start, stop, limit) -> where the first line nested deeper than limit starts, or -1"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Index_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    unsigned long long seed;
    static char *names[] = {"seed", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "K:CustomIdIndex", names, &seed)) {
        return NULL;
    }
    Index *self = (Index *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->buckets = PyMem_Calloc(BUCKET_COUNT, sizeof(Bucket));
    if (self->buckets == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->seed = seed;
    return (PyObject *)self;
}

static void
Index_dealloc(Index *self)
{
    if (self->buckets != NULL) {
        for (unsigned i = 0; i < BUCKET_COUNT; i++) {
            PyMem_Free(self->buckets[i].words);
            PyMem_Free(self->buckets[i].lines);
        }
        PyMem_Free(self->buckets);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Index_len(Index *self)
{
    return self->count;
}

static PyMethodDef Index_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Index_add, METH_FASTCALL,
     "add(custom_id, line) -> the line it first appeared on, or 0 (it is now held as `line`)"},
    {"add_run", (PyCFunction)(void (*)(void))Index_add_run, METH_FASTCALL,
     "add_run(custom_ids, first_line) -> [(line, custom_id, its first line)] of the duplicates"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Index_as_sequence = {
    .sq_length = (lenfunc)Index_len,
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "batchgate_server.core._jsonl_native.CustomIdIndex",
    .tp_doc = "custom_id -> the line it first appeared on, in 12 bytes an id",
    .tp_basicsize = sizeof(Index),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Index_new,
    .tp_dealloc = (destructor)Index_dealloc,
    .tp_methods = Index_methods,
    .tp_as_sequence = &Index_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "batchgate_server.core._jsonl_native",
    .m_doc = "The per-line loops of core/jsonl_validation.py, in C.",
    .m_size = -1,
    .m_methods = module_functions,
};

PyMODINIT_FUNC
PyInit__jsonl_native(void)
{
    if (PyType_Ready(&IndexType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&IndexType);
    if (PyModule_AddObject(m, "CustomIdIndex", (PyObject *)&IndexType) < 0) {
        Py_DECREF(&IndexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
