/*
 * kbuild-bolt: a QEMU TCG plugin that records where the guest kernel runs.
 *
 * For every translation block (TB) of kernel code it counts executions, and
 * for every pair of consecutive kernel TBs on a vCPU it counts the transition.
 * A TB is keyed by its first and last instruction (QEMU may translate the same
 * start again with fewer instructions: icount budget, faults), so a
 * fall-through into a shorter translation is never mistaken for a jump.
 *
 * Debian ships no qemu-plugin.h, so the few API declarations this plugin uses
 * (QEMU plugin API version 1, QEMU 7.x) are spelled out below.
 *
 * It also drives a simulated L1 instruction cache (32 KiB, 8-way, 64-byte
 * lines, LRU) per vCPU with the kernel TBs as they run: every line a TB's bytes
 * touch is one fetch.
 *
 * Indirect calls through a retpoline thunk (call __x86_indirect_thunk_<reg>)
 * reach their target by way of the thunk, which every such call site shares, so
 * the transitions above lose which site went where. A call whose target lies in
 * a thunk range is followed through the thunks to the first code outside them:
 * that pair is the call's real target. The host gives the ranges as offsets in
 * a 2 MiB window (KASLR moves the kernel by multiples of 2 MiB):
 * "thunk=LO:LEN" for indirect-call thunks, "via=LO:LEN" for code a call passes
 * through on the way (return thunks).
 *
 * A cut-off: with "console=PATH" (the file QEMU writes the guest's serial
 * console to) and "start=HEX"/"stop=HEX" (marker texts, hex-encoded), nothing
 * is counted until a console line containing the start text is complete, and
 * nothing after the first line after it containing the stop text. The console
 * file is read every POLL_EVERY TB executions (QEMU writes a character when the
 * guest sends it, in the same thread), so the cut-off is exact to a few
 * thousand TBs of guest execution, whatever the host does meanwhile.
 *
 * Output (text): "T start last ninsns count" per TB,
 *                "E from_start from_last to_start to_last count" per transition,
 *                "C call_site target count" per indirect call through a thunk,
 *                "L fetches misses" for the simulated L1i,
 *                "G state" the cut-off at the end: 0 start text never seen,
 *                1 counting (stop text never seen), 2 stopped.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define KERNEL_BASE 0xffff800000000000ULL
#define MAX_VCPUS 256

/* call_to: the target of a direct call ending the TB, 0 when it ends otherwise */
struct tb_rec { uint64_t start, last, end, count, call_to; uint32_t ninsns; };

/* Thunk ranges, as offsets in a 2 MiB window. */
#define WINDOW_MASK 0x1fffffULL
#define MAX_RANGES 16
struct range { uint64_t lo, len; };
static struct range thunks[MAX_RANGES], vias[MAX_RANGES];
static int n_thunks, n_vias;

static bool in_ranges(const struct range *r, int n, uint64_t addr)
{
    if (addr < KERNEL_BASE) return false;
    for (int i = 0; i < n; i++)
        if (((addr - r[i].lo) & WINDOW_MASK) < r[i].len) return true;
    return false;
}

/* Indirect calls through thunks: (site, target) -> count, and per vCPU the call
 * being followed through the thunks. */
struct icall { uint64_t site, target, count; };
static struct icall *icalls;
static size_t icalls_cap, icalls_len;
static uint64_t following[MAX_VCPUS];

/* The simulated L1i: 64 sets of 8 ways of 64-byte lines, LRU by age stamps. */
#define L1I_SETS 64
#define L1I_WAYS 8
struct l1i { uint64_t tag[L1I_SETS][L1I_WAYS]; uint64_t used[L1I_SETS][L1I_WAYS]; uint64_t clock; };
static struct l1i *l1i[MAX_VCPUS];
static uint64_t l1i_fetches, l1i_misses;

static void l1i_fetch(struct l1i *c, uint64_t line)
{
    unsigned set = line & (L1I_SETS - 1);
    uint64_t tag = line + 1;            /* 0: an empty way */
    int victim = 0;
    c->clock++;
    l1i_fetches++;
    for (int w = 0; w < L1I_WAYS; w++) {
        if (c->tag[set][w] == tag) { c->used[set][w] = c->clock; return; }
        if (c->used[set][w] < c->used[set][victim]) victim = w;
    }
    l1i_misses++;
    c->tag[set][victim] = tag;
    c->used[set][victim] = c->clock;
}
struct edge { struct tb_rec *from, *to; uint64_t count; };

static struct tb_rec **tbs;          /* hash table of TB records by (start, last) */
static size_t tbs_cap, tbs_len;
static struct edge *edges;           /* hash table of transitions */
static size_t edges_cap, edges_len;
static struct tb_rec *prev_tb[MAX_VCPUS];
static char *out_path;

static uint64_t mix(uint64_t a, uint64_t b)
{
    uint64_t h = a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL + (a << 6) + (a >> 2));
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 29);
}

static void tbs_grow(void)
{
    size_t cap = tbs_cap ? tbs_cap * 2 : 1 << 16;
    struct tb_rec **t = calloc(cap, sizeof(*t));
    for (size_t i = 0; i < tbs_cap; i++) {
        struct tb_rec *r = tbs[i];
        if (!r) continue;
        size_t j = mix(r->start, r->last) & (cap - 1);
        while (t[j]) j = (j + 1) & (cap - 1);
        t[j] = r;
    }
    free(tbs);
    tbs = t;
    tbs_cap = cap;
}

static struct tb_rec *tb_get(uint64_t start, uint64_t last, uint32_t n)
{
    if ((tbs_len + 1) * 2 > tbs_cap) tbs_grow();
    size_t j = mix(start, last) & (tbs_cap - 1);
    while (tbs[j]) {
        if (tbs[j]->start == start && tbs[j]->last == last) return tbs[j];
        j = (j + 1) & (tbs_cap - 1);
    }
    struct tb_rec *r = calloc(1, sizeof(*r));
    r->start = start; r->last = last; r->ninsns = n;
    tbs[j] = r;
    tbs_len++;
    return r;
}

static void edges_grow(void)
{
    size_t cap = edges_cap ? edges_cap * 2 : 1 << 17;
    struct edge *t = calloc(cap, sizeof(*t));
    for (size_t i = 0; i < edges_cap; i++) {
        struct edge *e = &edges[i];
        if (!e->from) continue;
        size_t j = mix((uint64_t)e->from, (uint64_t)e->to) & (cap - 1);
        while (t[j].from) j = (j + 1) & (cap - 1);
        t[j] = *e;
    }
    free(edges);
    edges = t;
    edges_cap = cap;
}

static void edge_add(struct tb_rec *from, struct tb_rec *to)
{
    if ((edges_len + 1) * 2 > edges_cap) edges_grow();
    size_t j = mix((uint64_t)from, (uint64_t)to) & (edges_cap - 1);
    while (edges[j].from) {
        if (edges[j].from == from && edges[j].to == to) { edges[j].count++; return; }
        j = (j + 1) & (edges_cap - 1);
    }
    edges[j].from = from; edges[j].to = to; edges[j].count = 1;
    edges_len++;
}

static void icalls_grow(void)
{
    size_t cap = icalls_cap ? icalls_cap * 2 : 1 << 12;
    struct icall *t = calloc(cap, sizeof(*t));
    for (size_t i = 0; i < icalls_cap; i++) {
        struct icall *c = &icalls[i];
        if (!c->site) continue;
        size_t j = mix(c->site, c->target) & (cap - 1);
        while (t[j].site) j = (j + 1) & (cap - 1);
        t[j] = *c;
    }
    free(icalls);
    icalls = t;
    icalls_cap = cap;
}

static void icall_add(uint64_t site, uint64_t target)
{
    if ((icalls_len + 1) * 2 > icalls_cap) icalls_grow();
    size_t j = mix(site, target) & (icalls_cap - 1);
    while (icalls[j].site) {
        if (icalls[j].site == site && icalls[j].target == target) { icalls[j].count++; return; }
        j = (j + 1) & (icalls_cap - 1);
    }
    icalls[j].site = site; icalls[j].target = target; icalls[j].count = 1;
    icalls_len++;
}

static void follow_thunks(unsigned int vcpu, struct tb_rec *r)
{
    if (following[vcpu]) {
        if (in_ranges(thunks, n_thunks, r->start) || in_ranges(vias, n_vias, r->start))
            return;                                  /* still on the way */
        icall_add(following[vcpu], r->start);
        following[vcpu] = 0;
    }
    if (r->call_to && in_ranges(thunks, n_thunks, r->call_to))
        following[vcpu] = r->last;
}

/* The cut-off (see the top of this file). */
#define POLL_EVERY 4096
#define LINE_MAX_KEPT 4096
enum { WAITING, COUNTING, STOPPED };
static int gate = COUNTING;
static char *console_path, *start_text, *stop_text;
static int console_fd = -1;
static char console_line[LINE_MAX_KEPT + 1];
static size_t console_len;
static uint64_t ticks;

static void console_line_done(void)
{
    console_line[console_len] = 0;
    if (gate == WAITING && strstr(console_line, start_text)) gate = COUNTING;
    else if (gate == COUNTING && stop_text && strstr(console_line, stop_text)) gate = STOPPED;
    console_len = 0;
}

static void poll_console(void)
{
    char buf[4096];
    ssize_t n;
    if (console_fd < 0) console_fd = open(console_path, O_RDONLY);
    if (console_fd < 0) return;
    while ((n = read(console_fd, buf, sizeof(buf))) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n') console_line_done();
            else if (console_len < LINE_MAX_KEPT) console_line[console_len++] = buf[i];
        }
    }
}

/* True while counting; polls the console now and then while a marker is awaited. */
static bool gate_open(unsigned int vcpu)
{
    if (start_text && gate != STOPPED && (++ticks & (POLL_EVERY - 1)) == 0) poll_console();
    if (gate == COUNTING) return true;
    if (vcpu < MAX_VCPUS) { prev_tb[vcpu] = NULL; following[vcpu] = 0; }
    return false;
}

static void tb_exec(unsigned int vcpu, void *udata)
{
    struct tb_rec *r = udata;
    if (!gate_open(vcpu)) return;
    r->count++;
    if (vcpu < MAX_VCPUS) {
        if (prev_tb[vcpu]) edge_add(prev_tb[vcpu], r);
        prev_tb[vcpu] = r;
        if (n_thunks) follow_thunks(vcpu, r);
        if (!l1i[vcpu]) l1i[vcpu] = calloc(1, sizeof(struct l1i));
        for (uint64_t line = r->start >> 6; line <= (r->end - 1) >> 6; line++)
            l1i_fetch(l1i[vcpu], line);
    }
}

static void user_exec(unsigned int vcpu, void *udata)
{
    (void)udata;
    gate_open(vcpu);
    if (vcpu < MAX_VCPUS) prev_tb[vcpu] = NULL;  /* left the kernel */
    if (vcpu < MAX_VCPUS) following[vcpu] = 0;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    uint64_t start = qemu_plugin_tb_vaddr(tb);
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (start < KERNEL_BASE) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, user_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
        return;
    }
    struct qemu_plugin_insn *last_insn = n ? qemu_plugin_tb_get_insn(tb, n - 1) : NULL;
    uint64_t last = last_insn ? qemu_plugin_insn_vaddr(last_insn) : start;
    struct tb_rec *r = tb_get(start, last, (uint32_t)n);
    size_t size = last_insn ? qemu_plugin_insn_size(last_insn) : 1;
    r->end = last + size;
    r->call_to = 0;                            /* (this translation's bytes decide) */
    if (last_insn && (size == 5 || size == 6)) {
        /* call rel32, or with a CS prefix (GCC's -mindirect-branch-cs-prefix on
         * calls of the r8-r15 thunks): where it goes */
        const uint8_t *b = qemu_plugin_insn_data(last_insn);
        size_t op = size - 5;
        if (b && b[op] == 0xe8 && (op == 0 || b[0] == 0x2e)) {
            int32_t rel;
            memcpy(&rel, b + op + 1, 4);
            r->call_to = r->end + (int64_t)rel;
        }
    }
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, r);
}

static void at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    FILE *f = fopen(out_path, "w");
    if (!f) return;
    fprintf(f, "# kbuild-bolt qemu profile v1\n");
    for (size_t i = 0; i < tbs_cap; i++) {
        struct tb_rec *r = tbs[i];
        if (r && r->count)
            fprintf(f, "T %llx %llx %u %llu\n", (unsigned long long)r->start,
                    (unsigned long long)r->last, r->ninsns, (unsigned long long)r->count);
    }
    for (size_t i = 0; i < edges_cap; i++) {
        struct edge *e = &edges[i];
        if (e->from)
            fprintf(f, "E %llx %llx %llx %llx %llu\n", (unsigned long long)e->from->start,
                    (unsigned long long)e->from->last, (unsigned long long)e->to->start,
                    (unsigned long long)e->to->last, (unsigned long long)e->count);
    }
    for (size_t i = 0; i < icalls_cap; i++) {
        struct icall *c = &icalls[i];
        if (c->site)
            fprintf(f, "C %llx %llx %llu\n", (unsigned long long)c->site,
                    (unsigned long long)c->target, (unsigned long long)c->count);
    }
    fprintf(f, "L %llu %llu\n", (unsigned long long)l1i_fetches, (unsigned long long)l1i_misses);
    fprintf(f, "G %d\n", gate);
    fclose(f);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) out_path = strdup(argv[i] + 4);
        if (strncmp(argv[i], "console=", 8) == 0) console_path = strdup(argv[i] + 8);
        bool start = strncmp(argv[i], "start=", 6) == 0;
        if (start || strncmp(argv[i], "stop=", 5) == 0) {
            const char *hex = strchr(argv[i], '=') + 1;
            size_t n = strlen(hex) / 2;
            char *text = calloc(n + 1, 1);
            for (size_t k = 0; k < n; k++) {
                unsigned v;
                if (sscanf(hex + 2 * k, "%2x", &v) != 1) { fprintf(stderr, "kbb plugin: bad %s\n", argv[i]); return -1; }
                text[k] = (char)v;
            }
            if (start) start_text = text; else stop_text = text;
        }
        bool thunk = strncmp(argv[i], "thunk=", 6) == 0, via = strncmp(argv[i], "via=", 4) == 0;
        if (thunk || via) {
            struct range *r = thunk ? &thunks[n_thunks] : &vias[n_vias];
            if ((thunk ? n_thunks : n_vias) >= MAX_RANGES
                    || sscanf(argv[i] + (thunk ? 6 : 4), "%llx:%llx",
                              (unsigned long long *)&r->lo, (unsigned long long *)&r->len) != 2) {
                fprintf(stderr, "kbb plugin: bad %s\n", argv[i]);
                return -1;
            }
            r->lo &= WINDOW_MASK;
            if (thunk) n_thunks++; else n_vias++;
        }
    }
    if (!out_path) {
        fprintf(stderr, "kbb plugin: out=FILE missing\n");
        return -1;
    }
    if ((start_text && !console_path) || (stop_text && !start_text)) {
        fprintf(stderr, "kbb plugin: stop= needs start=, and start= needs console=FILE\n");
        return -1;
    }
    if (start_text) gate = WAITING;
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
