// The collector's batch update on the CPU in one pass per (layer, block of units): statistics, then the top,
// bottom and band-sample lists, then the kept activations of the excerpts that entered them.
//
// Built and loaded by nbutils/collect/cpu_kernel.py (plain C++17, no torch headers; compiled once per
// machine). It does what Collector.update's torch path does for float32 values on the CPU, with the same
// results: the same lists (the same order_keys, so the same winners, ties included) and the same statistics up
// to the order of float64 additions. Why a kernel: on a CPU the torch path reads the batch's values several
// times (statistics, one merge per list) in strided column blocks and spends most of its time in small tensor
// operations; here each block of units is read once from memory, and the lists are merged one candidate at a
// time (a batch of 32 excerpts rarely changes a list that has filled).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// lowbias32 (Chris Wellons' hash-prospector): a 32-bit integer hash with low bias. Band-sample priority keys
// are a pure function of (seed, layer, unit, excerpt), so every device, shard, batch size and unit subset draws
// the same key for the same excerpt. nbutils/collect/collector.py:band_keys is the same function in torch.
inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

inline float band_key(uint32_t seed, uint32_t layer, uint32_t unit, uint32_t excerpt) {
    uint32_t h = mix32(seed ^ 0x9e3779b9U);
    h = mix32(h ^ layer);
    h = mix32(h ^ unit);
    h = mix32(h ^ excerpt);
    return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);  // 24 bits: exact in float32, in [0, 1)
}

// collector.py:order_keys: the float's bits mapped to an integer of the same order in the high 32 bits, the
// excerpt (earlier is better) in the low 32.
inline int64_t order_key(float key, int64_t index, bool largest) {
    int32_t bits;
    std::memcpy(&bits, &key, sizeof bits);
    const int64_t b = bits;
    const int64_t ordered = b < 0 ? -(b & 0x7FFFFFFF) - 1 : b;
    const int64_t tie = largest ? (2147483647LL - index) : (index + 1);
    return ordered * 4294967296LL + tie;
}

struct Batch {
    const float* x;  // [L, B, T, N]
    int64_t L, B, T, N, start;
};

struct Lists {
    float* key;      // [L, R, m]
    int64_t* index;  // [L, R, m]
    float* acts;     // [L, R, m, T]
    int64_t m;
};

struct Entry {  // one slot that a batch's excerpt entered: copy x[l, b, :, n] into dest
    int64_t b, n;
    float* dest;
};

// Statistics of the columns [n0, n0 + W) of one excerpt's T tokens: power sums of (x - shift) in float64 added
// to s[0..3][N], the excerpt's max and min, the active-token count. Accumulators stay in registers.
template <int W, bool SIGNED>
inline void tile_stats(const float* x, int64_t T, int64_t N, const float* shift, double* s, float* mx, float* mn,
                       int64_t* active) {
    double a1[W], a2[W], a3[W], a4[W], sh[W];
    float hi[W], lo[W];
    int32_t c[W], nan[W];
    for (int j = 0; j < W; ++j) {
        a1[j] = a2[j] = a3[j] = a4[j] = 0.0;
        sh[j] = shift[j];
        hi[j] = x[j];
        lo[j] = x[j];
        c[j] = nan[j] = 0;
    }
    for (int64_t t = 0; t < T; ++t) {
        const float* r = x + t * N;
        for (int j = 0; j < W; ++j) {
            const float v = r[j];
            const double d = static_cast<double>(v) - sh[j];
            const double d2 = d * d;
            a1[j] += d;
            a2[j] += d2;
            a3[j] += d2 * d;
            a4[j] += d2 * d2;
            hi[j] = v > hi[j] ? v : hi[j];
            lo[j] = v < lo[j] ? v : lo[j];
            nan[j] |= v != v;
            c[j] += SIGNED ? (v != 0.0f) : (v > 0.0f);
        }
    }
    for (int j = 0; j < W; ++j) {
        if (nan[j]) hi[j] = lo[j] = NAN;  // NaN wins, as in torch.amax
    }
    for (int j = 0; j < W; ++j) {
        s[j] += a1[j];
        s[N + j] += a2[j];
        s[2 * N + j] += a3[j];
        s[3 * N + j] += a4[j];
        mx[j] = hi[j];
        mn[j] = lo[j];
        active[j] += c[j];
    }
}

// Merge candidates (key, excerpt) into one row's unordered list of the m best (largest or smallest order_key),
// replacing the worst kept entry each time a candidate beats it: the same m winners as one topk over the kept
// and the candidates. Returns whether the row changed.
struct Row {
    float* key;
    int64_t* index;
    int64_t m;
    bool largest;
    int64_t worst_slot = -1;
    int64_t worst = 0;

    void find_worst() {
        worst_slot = 0;
        worst = order_key(key[0], index[0], largest);
        for (int64_t j = 1; j < m; ++j) {
            const int64_t o = order_key(key[j], index[j], largest);
            if (largest ? o < worst : o > worst) {
                worst = o;
                worst_slot = j;
            }
        }
    }

    bool offer(float k, int64_t excerpt) {
        if (m == 0) return false;
        if (worst_slot < 0) find_worst();
        const int64_t o = order_key(k, excerpt, largest);
        if (!(largest ? o > worst : o < worst)) return false;
        key[worst_slot] = k;
        index[worst_slot] = excerpt;
        find_worst();
        return true;
    }
};

// The slots of one changed row whose excerpt arrived in this batch: their activations are copied at the end.
void note_entries(const Row& row, float* acts, int64_t n, const Batch& bt, std::vector<Entry>& out) {
    for (int64_t j = 0; j < row.m; ++j) {
        if (row.index[j] >= bt.start) out.push_back({row.index[j] - bt.start, n, acts + j * bt.T});
    }
}

// Whether a largest-first row may take a candidate: some candidate reaches its smallest kept key. The float
// order agrees with order_key but for NaN and signed zeros, which go to the exact test (Row::offer); a row the
// batch cannot change (most rows, once the lists have filled) is skipped without computing its order keys.
inline bool may_enter(const float* key, int64_t m, float best, bool best_nan) {
    if (m == 0) return false;
    float lowest = key[0];
    bool nan = best_nan;
    for (int64_t j = 0; j < m; ++j) {
        nan |= key[j] != key[j];
        lowest = key[j] < lowest ? key[j] : lowest;
    }
    return nan || !(best < lowest);
}

struct Work {
    Batch bt;
    const float* shift;  // [L, N]
    bool is_signed;
    double* sums;        // [L, 4, N], added to
    int64_t* active;     // [L, N], added to
    float* bmax;         // [L, B, N], written
    float* bmin;
    Lists top, bottom, band;
    int64_t nb;               // bands; band lists have N * nb rows per layer
    const float* edges;       // [L, N, nb + 1]; null: no band sampling this batch
    uint32_t seed;
    const int64_t* layer_id;  // [L]
    const int64_t* unit_id;   // [L, N]: the unit each column holds
    int64_t block;            // units per work item
};

// Offer the batch's excerpts to one unit's top (or, with negate, bottom) list; cand[b * N] is excerpt b's max
// (min) of this unit.
void merge_best(const Lists& lst, int64_t row, int64_t n, float best, bool nan, const float* cand, bool negate,
                const Batch& bt, std::vector<Entry>& entries) {
    Row r{lst.key + row * lst.m, lst.index + row * lst.m, lst.m, true};
    if (!may_enter(r.key, r.m, best, nan)) return;
    bool changed = false;
    for (int64_t b = 0; b < bt.B; ++b) {
        const float v = cand[b * bt.N];
        changed |= r.offer(negate ? -v : v, bt.start + b);
    }
    if (changed) note_entries(r, lst.acts + row * lst.m * bt.T, n, bt, entries);
}

// Offer each excerpt to the band sample of the band its max falls in (the torch path's test: band 0 is
// everything below its upper edge), keyed by the hash of (seed, layer, unit, excerpt).
void merge_bands(const Work& w, int64_t l, int64_t n, std::vector<Entry>& entries) {
    const Batch& bt = w.bt;
    const float* mx = w.bmax + l * bt.B * bt.N + n;
    const float* e = w.edges + (l * bt.N + n) * (w.nb + 1);
    const uint32_t layer = static_cast<uint32_t>(w.layer_id[l]);
    const uint32_t unit = static_cast<uint32_t>(w.unit_id[l * bt.N + n]);
    for (int64_t j = 0; j < w.nb; ++j) {
        const int64_t brow = (l * bt.N + n) * w.nb + j;
        Row band{w.band.key + brow * w.band.m, w.band.index + brow * w.band.m, w.band.m, false};
        bool changed = false;
        for (int64_t b = 0; b < bt.B; ++b) {
            const float v = mx[b * bt.N];
            if (!(v < e[j + 1]) || (j > 0 && !(v >= e[j]))) continue;
            const uint32_t excerpt = static_cast<uint32_t>(bt.start + b);
            changed |= band.offer(band_key(w.seed, layer, unit, excerpt), bt.start + b);
        }
        if (changed) note_entries(band, w.band.acts + brow * w.band.m * bt.T, n, bt, entries);
    }
}

void run_item(const Work& w, int64_t l, int64_t n0, int64_t n1) {
    const Batch& bt = w.bt;
    const int64_t B = bt.B, T = bt.T, N = bt.N;
    double* s = w.sums + l * 4 * N;
    for (int64_t b = 0; b < B; ++b) {
        const float* xe = bt.x + ((l * B + b) * T) * N;
        float* mx = w.bmax + (l * B + b) * N;
        float* mn = w.bmin + (l * B + b) * N;
        const float* sh = w.shift + l * N;
        int64_t* act = w.active + l * N;
        int64_t n = n0;
        for (; n + 16 <= n1; n += 16) {
            if (w.is_signed) tile_stats<16, true>(xe + n, T, N, sh + n, s + n, mx + n, mn + n, act + n);
            else tile_stats<16, false>(xe + n, T, N, sh + n, s + n, mx + n, mn + n, act + n);
        }
        for (; n < n1; ++n) {
            if (w.is_signed) tile_stats<1, true>(xe + n, T, N, sh + n, s + n, mx + n, mn + n, act + n);
            else tile_stats<1, false>(xe + n, T, N, sh + n, s + n, mx + n, mn + n, act + n);
        }
    }
    std::vector<Entry> entries;
    const int64_t units = n1 - n0;
    // per unit of the block: the batch's best top and bottom candidates (and whether any is NaN)
    std::vector<float> best_top(units, -INFINITY), best_bottom(units, -INFINITY);
    std::vector<char> nan(units, 0);
    for (int64_t b = 0; b < B; ++b) {
        const float* mx = w.bmax + (l * B + b) * N + n0;
        const float* mn = w.bmin + (l * B + b) * N + n0;
        for (int64_t i = 0; i < units; ++i) {
            best_top[i] = mx[i] > best_top[i] ? mx[i] : best_top[i];
            best_bottom[i] = -mn[i] > best_bottom[i] ? -mn[i] : best_bottom[i];
            nan[i] |= (mx[i] != mx[i]) | (mn[i] != mn[i]);
        }
    }
    for (int64_t n = n0; n < n1; ++n) {
        const int64_t i = n - n0, row = l * N + n;
        merge_best(w.top, row, n, best_top[i], nan[i], w.bmax + l * B * N + n, false, bt, entries);
        merge_best(w.bottom, row, n, best_bottom[i], nan[i], w.bmin + l * B * N + n, true, bt, entries);
        if (w.edges != nullptr) merge_bands(w, l, n, entries);
    }
    // copy per excerpt, row by row: the item's block of that excerpt's [T, N] values was just read for the
    // statistics and still sits in the cache, and its rows are read in memory order
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return a.b != b.b ? a.b < b.b : a.n < b.n; });
    for (size_t first = 0; first < entries.size();) {
        size_t last = first;
        while (last < entries.size() && entries[last].b == entries[first].b) ++last;
        const float* block = bt.x + ((l * B + entries[first].b) * T) * N;
        for (int64_t t = 0; t < T; ++t) {
            const float* row = block + t * N;
            for (size_t e = first; e < last; ++e) entries[e].dest[t] = row[entries[e].n];
        }
        first = last;
    }
}

}  // namespace

extern "C" {

int nbutils_kernel_version() { return 1; }

float nbutils_band_key(uint32_t seed, uint32_t layer, uint32_t unit, uint32_t excerpt) {
    return band_key(seed, layer, unit, excerpt);
}

// One batch: x [L, B, T, N] float32 contiguous. Statistics are added to sums/active and the excerpts' max/min
// written to bmax/bmin [L, B, N]; top and bottom lists ([L, N, m]) and, where edges is not null, band lists
// ([L, N, nb, m]) merged in place, the entering excerpts' activations copied. threads >= 1.
void nbutils_collect_batch(const float* x, int64_t L, int64_t B, int64_t T, int64_t N, int64_t start,
                           const float* shift, int32_t is_signed, double* sums, int64_t* active, float* bmax,
                           float* bmin, float* top_key, int64_t* top_index, float* top_acts, int64_t top_m,
                           float* bottom_key, int64_t* bottom_index, float* bottom_acts, int64_t bottom_m,
                           float* band_key_, int64_t* band_index, float* band_acts, int64_t band_m, int64_t nb,
                           const float* edges, uint32_t seed, const int64_t* layer_id, const int64_t* unit_id,
                           int32_t threads) {
    Work w{{x, L, B, T, N, start}, shift, is_signed != 0, sums, active, bmax, bmin,
           {top_key, top_index, top_acts, top_m}, {bottom_key, bottom_index, bottom_acts, bottom_m},
           {band_key_, band_index, band_acts, band_m}, nb, edges, seed, layer_id, unit_id, 0};
    const int64_t nthreads = std::max<int64_t>(1, threads);
    // enough items to balance the threads; blocks a multiple of 16 units so tiles stay whole
    const int64_t per_layer = std::max<int64_t>(1, (4 * nthreads + L - 1) / L);
    w.block = std::max<int64_t>(16, ((N + per_layer - 1) / per_layer + 15) / 16 * 16);
    const int64_t blocks = (N + w.block - 1) / w.block;
    const int64_t items = L * blocks;
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t i = next++; i < items; i = next++) {
            const int64_t l = i / blocks, n0 = (i % blocks) * w.block;
            run_item(w, l, n0, std::min(N, n0 + w.block));
        }
    };
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < std::min(nthreads, items); ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

}  // extern "C"
