// Checks the tensor-core search's tile layout (csrc/cuda/mma_layout.h) on the host: ldmatrix.x4
// and mma.m16n8k16 are emulated from the PTX ISA's fragment rules, fed through the kernel's own
// offset functions, and every warp's accumulators are compared with a plain product of the
// shared-memory tiles. Exits non-zero, naming the first mismatch.
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "cuda/mma_layout.h"

using namespace reco::cuda::mma;
using Regs = std::vector<std::array<double, 2>>;  // per lane per register: two 16-bit elements

static int fail(const char* what, int a, int b, int c) {
  std::printf("FAIL: %s (%d, %d, %d)\n", what, a, b, c);
  return 1;
}

// ldmatrix.x4: lane 8m + r passes the address of row r of matrix m; lane 4r + w receives
// elements 2w and 2w + 1 of that row in its register m.
template <typename Offset>
static std::vector<Regs> ldmatrix_x4(const std::vector<double>& smem, Offset offset) {
  std::vector<Regs> regs(32, Regs(4));
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      const int row_addr = offset(8 * m + lane / 4);
      const int w = lane % 4;
      regs[lane][m] = {smem[row_addr + 2 * w], smem[row_addr + 2 * w + 1]};
    }
  return regs;
}

// mma.m16n8k16 (A row-major 16x16, B column-major 16x8, fp32 accumulators), PTX fragment rules:
// a_i: row g (+8 for i in {2,3,6,7}), col 2t + (i & 1) (+8 for i >= 4); register j = a_2j, a_2j+1.
// b_i: k 2t + (i & 1) (+8 for i >= 2), n g. c_i: row g (+8 for i >= 2), col 2t + (i & 1).
// (g = lane / 4, t = lane % 4.) a: each lane's registers a0..a3; b: registers b0, b1 are
// b[lane][b0], b[lane][b0 + 1].
static void mma(std::vector<std::array<double, 4>>& c, const std::vector<Regs>& a,
                const std::vector<Regs>& b, int b0) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 8; ++i)
      A[g + (i % 4 >= 2 ? 8 : 0)][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = a[lane][i / 2][i % 2];
    for (int i = 0; i < 4; ++i)
      B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = b[lane][b0 + i / 2][i % 2];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      for (int kk = 0; kk < 16; ++kk) c[lane][i] += A[row][kk] * B[kk][col];
    }
  }
}

int main() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> qt(kQueries * kPitch, NAN), kt(kRows * kPitch, NAN);  // pads stay NaN
  for (int r = 0; r < kQueries; ++r)
    for (int c = 0; c < kChunk; ++c) qt[r * kPitch + c] = u(gen);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunk; ++c) kt[r * kPitch + c] = u(gen);

  std::set<std::pair<int, int>> seen;
  for (int wq = 0; wq < kWarpsQ; ++wq)
    for (int wn = 0; wn < kWarpsN; ++wn) {
      // acc[mt][nt][lane][i]
      std::vector<std::vector<std::vector<std::array<double, 4>>>> acc(
          kMT, std::vector<std::vector<std::array<double, 4>>>(
                   kNT, std::vector<std::array<double, 4>>(32, {0, 0, 0, 0})));
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        for (int mt = 0; mt < kMT; ++mt) {
          // Row addresses: 16-byte aligned, and the 8 rows of each matrix in distinct bank groups.
          for (int m = 0; m < 4; ++m) {
            std::set<int> groups;
            for (int r = 0; r < 8; ++r) {
              const int off = a_offset(wq, mt, ks, 8 * m + r);
              if (off * 2 % 16) return fail("A row address not 16-byte aligned", wq, mt, ks);
              groups.insert(off * 2 / 16 % 8);
            }
            if (groups.size() != 8) return fail("A ldmatrix bank conflict", wq, mt, m);
          }
        }
        for (int p = 0; p < kNT / 2; ++p)
          for (int m = 0; m < 4; ++m) {
            std::set<int> groups;
            for (int r = 0; r < 8; ++r) {
              const int off = b_offset(wn, p, ks, 8 * m + r);
              if (off * 2 % 16) return fail("B row address not 16-byte aligned", wn, p, ks);
              groups.insert(off * 2 / 16 % 8);
            }
            if (groups.size() != 8) return fail("B ldmatrix bank conflict", wn, p, m);
          }
        std::vector<std::vector<Regs>> a(kMT), b(kNT / 2);
        for (int mt = 0; mt < kMT; ++mt)
          a[mt] = ldmatrix_x4(qt, [&](int lane) { return a_offset(wq, mt, ks, lane); });
        for (int p = 0; p < kNT / 2; ++p)
          b[p] = ldmatrix_x4(kt, [&](int lane) { return b_offset(wn, p, ks, lane); });
        for (int mt = 0; mt < kMT; ++mt)
          for (int nt = 0; nt < kNT; ++nt) mma(acc[mt][nt], a[mt], b[nt / 2], (nt & 1) * 2);
      }
      for (int mt = 0; mt < kMT; ++mt)
        for (int nt = 0; nt < kNT; ++nt)
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) {
              const int q = c_query(wq, mt, lane, i), r = c_row(wn, nt, lane, i);
              if (q < 0 || q >= kQueries || r < 0 || r >= kRows)
                return fail("accumulator outside the block tile", q, r, i);
              if (!seen.insert({q, r}).second) return fail("accumulator held twice", q, r, i);
              double want = 0;
              for (int c = 0; c < kChunk; ++c) want += qt[q * kPitch + c] * kt[r * kPitch + c];
              const double got = acc[mt][nt][lane][i];
              if (!(std::fabs(got - want) <= 1e-9 * (1 + std::fabs(want))))
                return fail("accumulator differs from the product", q, r, i);
            }
    }
  if (seen.size() != size_t(kQueries) * kRows) return fail("block tile not covered", 0, 0, 0);
  std::printf("ok: %d x %d block tile, %d warps\n", kQueries, kRows, kWarpsQ * kWarpsN);
  return 0;
}
