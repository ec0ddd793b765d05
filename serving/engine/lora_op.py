"""A CPU op that applies every row's LoRA reading each resident adapter once per call.

Why not torch: gathering per-row adapter copies for a bmm reads adapter bytes once per *row*;
a loop of per-adapter matmuls reads them once per adapter, but fp32 `mm` gives a row different
bits when M (rows sharing the adapter) crosses 3/4, so a request's greedy output would change
with the batch around it. This op groups rows by slot and, for each adapter row it reads, updates
every batch row of that slot. Each output element is summed in one fixed order (over d_in, then
over rank) whatever the batch holds, so mixed == solo stays bit-exact, and threads split work
only by slot, row tile and output column, never inside a sum.

Compiled on first use with torch's cpp_extension (g++ and ninja; about a minute, then cached
under ~/.cache/torch_extensions). `available()` says whether it built; the engine falls back to
the per-row bmm path, with a warning, where it cannot.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading

import torch

logger = logging.getLogger("loraplex.engine")

ROW_TILE = 16  # rows of one slot that share one read of its adapter (a prefill's tokens split into tiles)
SERIAL_BELOW = 1 << 16  # multiply-adds under which one thread is cheaper than waking the pool

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t V = 16;  // columns per accumulator vector (one AVX-512 register of floats)
constexpr int64_t RB = 4;  // rows sharing one load of an adapter row

template <typename T> inline float f32(T v) { return static_cast<float>(v); }

typedef float vf __attribute__((vector_size(V * 4)));  // V floats: the compiler's widest FMA
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const at::BFloat16* p) {  // bf16 is the top half of a float
  vh h; std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v; std::memcpy(&v, &u, sizeof v); return v;
}

struct Task { int64_t slot, rank, first, count; };  // `count` rows of `rows` from `first`

// acc[r][c] += sum over k in order of x_r[k] * w[k * ld + c * V : ... + V], for R rows and NC
// column vectors; each k reads NC adjacent vectors of w (one contiguous stretch). Every row's sum
// runs in the same order, with the same fused multiply-adds, whatever R and NC are: a row's bits
// never depend on its neighbours.
template <int64_t R, int64_t NC, typename X, typename W>
inline void panel_wide(const X* const* x, const W* w, int64_t ld, int64_t k_len, vf (*acc)[4]) {
  vf loc[R][NC];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < NC; ++c) loc[r][c] = acc[r][c];
  for (int64_t k = 0; k < k_len; ++k) {
    vf wk[NC];
    for (int64_t c = 0; c < NC; ++c) wk[c] = load(w + k * ld + c * V);
    for (int64_t r = 0; r < R; ++r) {
      const float xv = f32(x[r][k]);
      for (int64_t c = 0; c < NC; ++c) loc[r][c] += xv * wk[c];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < NC; ++c) acc[r][c] = loc[r][c];
}

template <int64_t NC, typename X, typename W>
void wide_rows(int64_t n, const X* const* x, const W* w, int64_t ld, int64_t k_len, vf (*acc)[4]) {
  int64_t r = 0;
  for (; r + RB <= n; r += RB) panel_wide<RB, NC>(x + r, w, ld, k_len, acc + r);
  switch (n - r) {
    case 3: panel_wide<3, NC>(x + r, w, ld, k_len, acc + r); break;
    case 2: panel_wide<2, NC>(x + r, w, ld, k_len, acc + r); break;
    case 1: panel_wide<1, NC>(x + r, w, ld, k_len, acc + r); break;
    default: break;
  }
}

template <typename X, typename W, typename O>
void run(const torch::Tensor& x, const torch::Tensor& token_slot, const torch::Tensor& slot_rank,
         const torch::Tensor& a, const std::vector<torch::Tensor>& bs, std::vector<torch::Tensor>& outs,
         int64_t row_tile, int64_t serial_below) {
  const int64_t n_rows = x.size(0), d_in = x.size(1), width = a.size(2), members = (int64_t)bs.size();
  const int64_t* slot_of = token_slot.data_ptr<int64_t>();
  const int64_t* rank_of = slot_rank.data_ptr<int64_t>();
  const X* xp = x.data_ptr<X>();
  const W* ap = a.data_ptr<W>();
  const int64_t n_slots = slot_rank.size(0);

  // Rows grouped by slot, ascending within a slot; slot 0 (the bare base) and rank 0 are skipped.
  std::vector<int64_t> rows, starts(n_slots + 1, 0);
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t s = slot_of[n];
    TORCH_CHECK(s >= 0 && s < n_slots, "token slot out of range");
    if (s > 0 && rank_of[s] > 0) starts[s + 1]++;
  }
  for (int64_t s = 0; s < n_slots; ++s) starts[s + 1] += starts[s];
  rows.resize(starts[n_slots]);
  {
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t n = 0; n < n_rows; ++n) {
      const int64_t s = slot_of[n];
      if (s > 0 && rank_of[s] > 0) rows[fill[s]++] = n;
    }
  }
  std::vector<Task> tasks;
  int64_t work = 0;
  for (int64_t s = 1; s < n_slots; ++s)
    for (int64_t i = starts[s]; i < starts[s + 1]; i += row_tile) {
      tasks.push_back({s, rank_of[s], i, std::min(row_tile, starts[s + 1] - i)});
      work += tasks.back().count * rank_of[s] * members * d_in;
    }
  if (tasks.empty()) return;

  // A slot's A holds its members side by side at the slot's own rank: [d_in, members * rank],
  // padded with zeros to `width`; B rows past the rank are zero.
  const int64_t n_tasks = (int64_t)tasks.size();
  std::vector<float> h(rows.size() * width, 0.f);
  auto stage_a = [&](int64_t t) {  // h[row] = x[row] @ A[slot]
    const Task& task = tasks[t];
    const int64_t used = ((members * task.rank + V - 1) / V) * V;
    const X* xr[16];
    for (int64_t r = 0; r < task.count; ++r) xr[r] = xp + rows[task.first + r] * d_in;
    for (int64_t c0 = 0; c0 < used; c0 += 4 * V) {
      const int64_t nc = std::min<int64_t>(4, (used - c0) / V);
      vf acc[16][4] = {};
      const W* w = ap + task.slot * d_in * width + c0;
      switch (nc) {
        case 4: wide_rows<4>(task.count, xr, w, width, d_in, acc); break;
        case 3: wide_rows<3>(task.count, xr, w, width, d_in, acc); break;
        case 2: wide_rows<2>(task.count, xr, w, width, d_in, acc); break;
        default: wide_rows<1>(task.count, xr, w, width, d_in, acc); break;
      }
      for (int64_t r = 0; r < task.count; ++r)
        std::memcpy(h.data() + (task.first + r) * width + c0, acc[r], nc * sizeof(vf));
    }
  };
  struct Piece { int64_t task, member, c0; };
  std::vector<Piece> pieces;
  for (int64_t j = 0; j < members; ++j)
    for (int64_t t = 0; t < n_tasks; ++t)
      for (int64_t c0 = 0; c0 < bs[j].size(2); c0 += 8 * V) pieces.push_back({t, j, c0});
  auto stage_b = [&](int64_t p) {  // out[row] += round(h_j[row] @ B_j[slot])
    const Piece& piece = pieces[p];
    const Task& task = tasks[piece.task];
    const int64_t d_out = bs[piece.member].size(2), rank = task.rank;
    const W* bp = bs[piece.member].template data_ptr<W>() + task.slot * bs[piece.member].size(1) * d_out;
    O* op = outs[piece.member].template data_ptr<O>();
    const float* hr[16];
    for (int64_t r = 0; r < task.count; ++r) hr[r] = h.data() + (task.first + r) * width + piece.member * rank;
    const int64_t c_end = std::min(d_out, piece.c0 + 8 * V);
    std::vector<W> tail;  // a last partial chunk of columns, zero-padded to V (same per-element math)
    auto add = [&](int64_t c0, const vf* acc, int64_t cols, int64_t r) {
      O* orow = op + rows[task.first + r] * d_out + c0;
      float delta[V];
      std::memcpy(delta, acc, sizeof delta);
      // the delta is rounded to the output's dtype before the add, as PEFT does (its logprobs match)
      for (int64_t c = 0; c < cols; ++c) orow[c] = static_cast<O>(f32(orow[c]) + f32(static_cast<O>(delta[c])));
    };
    int64_t c0 = piece.c0;
    for (; c0 + 4 * V <= c_end; c0 += 4 * V) {  // 4 whole vectors: each B row read as one 256-byte stretch
      vf acc[16][4] = {};
      wide_rows<4>(task.count, hr, bp + c0, d_out, rank, acc);
      for (int64_t r = 0; r < task.count; ++r)
        for (int64_t c = 0; c < 4; ++c) add(c0 + c * V, &acc[r][c], V, r);
    }
    for (; c0 < c_end; c0 += V) {
      vf acc[16][4] = {};
      const int64_t cols = std::min(V, d_out - c0);
      if (cols == V) {
        wide_rows<1>(task.count, hr, bp + c0, d_out, rank, acc);
      } else {
        tail.assign(rank * V, W(0.f));
        for (int64_t i = 0; i < rank; ++i) std::copy(bp + i * d_out + c0, bp + i * d_out + d_out, tail.begin() + i * V);
        wide_rows<1>(task.count, hr, tail.data(), V, rank, acc);
      }
      for (int64_t r = 0; r < task.count; ++r) add(c0, acc[r], cols, r);
    }
  };
  if (work < serial_below) {
    for (int64_t t = 0; t < n_tasks; ++t) stage_a(t);
    for (int64_t p = 0; p < (int64_t)pieces.size(); ++p) stage_b(p);
  } else {
    at::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) { for (int64_t t = b; t < e; ++t) stage_a(t); });
    at::parallel_for(0, (int64_t)pieces.size(), 1, [&](int64_t b, int64_t e) { for (int64_t p = b; p < e; ++p) stage_b(p); });
  }
}

template <typename X, typename W>
void by_out(const torch::Tensor& x, const torch::Tensor& ts, const torch::Tensor& sr, const torch::Tensor& a,
            const std::vector<torch::Tensor>& bs, std::vector<torch::Tensor>& outs, int64_t rt, int64_t sb) {
  if (outs[0].scalar_type() == torch::kFloat32) run<X, W, float>(x, ts, sr, a, bs, outs, rt, sb);
  else run<X, W, at::BFloat16>(x, ts, sr, a, bs, outs, rt, sb);
}

template <typename X>
void by_weight(const torch::Tensor& x, const torch::Tensor& ts, const torch::Tensor& sr, const torch::Tensor& a,
               const std::vector<torch::Tensor>& bs, std::vector<torch::Tensor>& outs, int64_t rt, int64_t sb) {
  if (a.scalar_type() == torch::kFloat32) by_out<X, float>(x, ts, sr, a, bs, outs, rt, sb);
  else by_out<X, at::BFloat16>(x, ts, sr, a, bs, outs, rt, sb);
}

}  // namespace

void lora_add(torch::Tensor x, torch::Tensor token_slot, torch::Tensor slot_rank, torch::Tensor a,
              std::vector<torch::Tensor> bs, std::vector<torch::Tensor> outs, int64_t row_tile, int64_t serial_below) {
  auto fp = [](const torch::Tensor& t) {
    return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
  };
  TORCH_CHECK(row_tile >= 1 && row_tile <= 16, "row_tile in 1..16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && fp(x) && !x.is_cuda(), "x: contiguous [rows, d_in] on CPU");
  TORCH_CHECK(token_slot.scalar_type() == torch::kInt64 && token_slot.numel() == x.size(0), "token_slot: int64 [rows]");
  TORCH_CHECK(slot_rank.scalar_type() == torch::kInt64 && slot_rank.is_contiguous(), "slot_rank: int64 [slots]");
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && fp(a) && a.size(1) == x.size(1), "a: [slots, d_in, members*rank]");
  TORCH_CHECK(!bs.empty() && bs.size() == outs.size(), "one b and out per member");
  TORCH_CHECK(a.size(2) % 16 == 0, "a's width: a multiple of 16");
  int64_t max_rank = 0;  // read directly: a torch max() per call costs more than this whole scan
  for (int64_t s = 0; s < slot_rank.size(0); ++s) max_rank = std::max(max_rank, slot_rank.data_ptr<int64_t>()[s]);
  const int64_t ranks_fit = (max_rank * (int64_t)bs.size() + 15) / 16 * 16;
  TORCH_CHECK(ranks_fit <= a.size(2), "a's width holds every member at the largest slot rank");
  for (size_t j = 0; j < bs.size(); ++j) {
    TORCH_CHECK(bs[j].dim() == 3 && bs[j].is_contiguous() && bs[j].scalar_type() == a.scalar_type(), "b: [slots, rank, d_out]");
    TORCH_CHECK(bs[j].size(0) == a.size(0) && bs[j].size(1) >= max_rank, "b's slots and rank fit");
    TORCH_CHECK(outs[j].dim() == 2 && outs[j].is_contiguous() && outs[j].size(0) == x.size(0)
                && outs[j].size(1) == bs[j].size(2) && fp(outs[j]) && outs[j].scalar_type() == outs[0].scalar_type(),
                "out: contiguous [rows, d_out]");
  }
  if (x.scalar_type() == torch::kFloat32) by_weight<float>(x, token_slot, slot_rank, a, bs, outs, row_tile, serial_below);
  else by_weight<at::BFloat16>(x, token_slot, slot_rank, a, bs, outs, row_tile, serial_below);
}
"""

_lock = threading.Lock()
_module = None
_error: str | None = None


def _build_name() -> str:
    """Source and CPU in the name: -march=native code must not be reused on another machine type."""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    key = hashlib.sha256((_SOURCE + torch.__version__ + platform.machine() + cpu).encode()).hexdigest()[:16]
    return f"loraplex_lora_{key}"


def _load():
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load_inline

                _module = load_inline(
                    name=_build_name(),
                    cpp_sources=_SOURCE,
                    functions=["lora_add"],
                    extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-mprefer-vector-width=512"],
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, no headers: the caller falls back
                _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                logger.warning("batched LoRA op did not build (%s); using the per-row bmm path", _error)
        return _module


def available() -> bool:
    """Whether the op builds here (builds it on the first call)."""
    return _load() is not None


def build_error() -> str | None:
    _load()
    return _error


def lora_add(
    x: torch.Tensor,
    token_slot: torch.Tensor,
    slot_rank: torch.Tensor,
    a: torch.Tensor,
    bs: list[torch.Tensor],
    outs: list[torch.Tensor],
) -> None:
    """outs[j][n] += (x[n] @ a[s, :, j*r:(j+1)*r]) @ bs[j][s, :r] for s = token_slot[n], r = slot_rank[s], in place.

    x: [rows, d_in]; a: [slots, d_in, W] with each slot's members packed side by side at its own
    rank r (zeros after; W a multiple of 16 that holds them at the largest r); bs[j]: [slots, R,
    d_out_j]; outs[j]: [rows, d_out_j]. Slot 0 is skipped.
    """
    (_module or _load()).lora_add(x, token_slot, slot_rank, a, bs, outs, ROW_TILE, SERIAL_BELOW)
