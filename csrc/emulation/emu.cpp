// The emulation runtime: fibers, the block scheduler, collectives, shared memory with its shadow,
// the PTX instructions and the launch rules. Compiled WITHOUT -fsanitize=thread: its own accesses
// to shared memory are checked explicitly, with the semantics of the instruction that makes them.
#ifndef RECO_EMULATION
#define RECO_EMULATION 1
#endif
#include "reco_emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace reco::emu {

thread_local const Indices* tls_indices = nullptr;

namespace {

// ---- the emulated devices ---------------------------------------------------------------------
constexpr Arch kSm80{"sm_80", 8, 0, 108, 166912, 167936, 65536};
constexpr Arch kSm90{"sm_90", 9, 0, 132, 232448, 233472, 65536};
constexpr int kDefaultSmem = 48 * 1024;  // per block without the opt-in
const Arch* g_arch = nullptr;

const Arch* arch_from_env() {
  const char* e = std::getenv("RECO_EMULATE_CUDA");
  if (e == nullptr || *e == 0 || std::strcmp(e, "sm_90") == 0 || std::strcmp(e, "1") == 0)
    return &kSm90;
  if (std::strcmp(e, "sm_80") == 0) return &kSm80;
  return nullptr;  // an unknown architecture: no device
}
const Arch* current_arch() {
  static const Arch* from_env = arch_from_env();
  return g_arch ? g_arch : from_env;
}

// ---- formatting ---------------------------------------------------------------------------------
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  va_list ap, ap2;
  va_start(ap, f);
  va_copy(ap2, ap);
  const int n = std::vsnprintf(nullptr, 0, f, ap);
  va_end(ap);
  std::string s(size_t(std::max(n, 0)), '\0');
  std::vsnprintf(s.data(), s.size() + 1, f, ap2);
  va_end(ap2);
  return s;
}
std::string site_str(Site s) {
  if (s.file == nullptr) return "?";
  const char* b = std::strrchr(s.file, '/');
  return fmt("%s:%d", b ? b + 1 : s.file, s.line);
}
bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}
// The function of a code address (the kernel making an instrumented access).
std::string code_str(const void* pc) {
  Dl_info info;
  if (pc == nullptr || dladdr(pc, &info) == 0) return "?";
  if (info.dli_sname == nullptr)  // a local symbol: addr2line -f -C -e <file> <offset> names it
    return fmt("%s+0x%lx", info.dli_fname,
               static_cast<unsigned long>(static_cast<const char*>(pc) -
                                          static_cast<const char*>(info.dli_fbase)));
  int st = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
  std::string name = st == 0 && d ? d : info.dli_sname;
  std::free(d);
  if (name.size() > 140) name = name.substr(0, 137) + "...";
  return fmt("%s+0x%lx", name.c_str(),
             static_cast<unsigned long>(static_cast<const char*>(pc) -
                                        static_cast<const char*>(info.dli_saddr)));
}

// ---- shared memory and its shadow -------------------------------------------------------------
// One arena: [redzone][static area][dynamic area][redzone]. A block's shared memory is the
// static bytes its __shared__ variables took plus the launch's dynamic bytes; every other byte of
// the arena is out of bounds.
constexpr size_t kStaticCap = 48 * 1024;  // CUDA's limit on static shared memory
constexpr size_t kDynCap = 232448;
constexpr size_t kRed = 64 * 1024;
constexpr unsigned char kPoison = 0xff;  // NaN as float, half, bfloat16 and double

enum : uint8_t { kWritten = 1, kAtomicW = 2, kInflight = 4 };
struct Cell {
  uint32_t w_epoch, w_c;  // the last write: barrier interval and the writer's own clock
  uint32_t r_epoch, r_c;  // the reads of interval r_epoch: one reader inline ...
  int32_t r_lanes;        // ... or a per-lane table of the reader warp (-1: none)
  int16_t w_tid, r_tid;
  int16_t r_warp;  // the warp that read in r_epoch; -2: several warps
  uint8_t flags;
  const void* w_pc;  // the code of the last write
};

struct Arena {
  unsigned char* base = nullptr;  // start of the static area
  unsigned char* lo = nullptr;    // start of the front redzone
  unsigned char* hi = nullptr;    // end of the back redzone
  std::vector<Cell> shadow;       // kStaticCap + kDynCap cells
  std::vector<std::array<uint32_t, 32>> lanes;
};

struct Pending {
  unsigned char* dst;
  int size, group;
  Site site;
  unsigned char data[16];
};

// ---- fibers -------------------------------------------------------------------------------------
enum class St { Ready, Blocked, Done };
enum class Wait { None, Barrier, Warp };
struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  Indices idx{};
  int tid = 0, warp = 0, lane = 0;
  St state = St::Ready;
  Wait wait = Wait::None;
  const char* what = "";
  Site site{};
  uint32_t wvc[32];  // warp vector clock: own entry, and what __syncwarp taught of the others
  std::vector<Pending> pending;
  int committed = 0;  // cp.async groups committed
  // Operands of the collective in progress and its results.
  uint64_t in = 0;
  int arg = 0, width = 0;
  const void* ptr = nullptr;
  uint32_t regs[10] = {};
  uint32_t out[4] = {};
  uint64_t out64 = 0;
};

enum class Op { Sync, Vote, Shfl, Mma16, Mma32, Ldm };
struct WarpOp {
  Op kind;
  int key;  // what else must match: vote/shfl mode and width, mma type, ldmatrix shape
  unsigned mask, arrived;
  const char* what;
  Site site;
};

struct KernelInfo {
  int regs = 0;
  bool static_given = false;
  size_t static_smem = 0;   // given, or the most a launch declared
  int max_dynamic = -1;     // cudaFuncAttributeMaxDynamicSharedMemorySize; -1: default
};

struct Launch {
  uint64_t id = 0;
  const void* kernel = nullptr;
  const char* name = nullptr;  // the kernel's signature, from its dynamic shared declaration
  KernelInfo* info = nullptr;
  dim3 grid, block;
  size_t dyn = 0, static_used = 0;
  int nthreads = 0, nwarps = 0;
  std::vector<Fiber> fibers;
  uint32_t bepoch = 1;
  int arrived = 0, exited = 0;
  Site bsite{};
  const char* bwhat = "";
  Reduce red = Reduce::None;
  int acc = 0;
  std::vector<std::vector<WarpOp>> warps;
  std::vector<unsigned> exited_lanes;
  bool failed = false;
  cudaError_t code = cudaSuccess;
  std::string report;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  ucontext_t sched;
};

std::mutex g_mutex;  // one launch at a time in the process (static shared memory is one arena)
Arena g_arena;
std::map<const void*, KernelInfo> g_kernels;
uint64_t g_launch_ids = 0;
std::vector<std::string> g_log;  // the kernels launched, for take_launch_log
std::vector<char*> g_stacks;
size_t g_stack_bytes = 0;

thread_local Launch* tls_launch = nullptr;
thread_local Fiber* tls_fiber = nullptr;
thread_local cudaError_t tls_error = cudaSuccess;
thread_local cudaError_t tls_report_code = cudaSuccess;
thread_local std::string tls_report;
thread_local std::string tls_report_full;

const char* plain_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

std::string who(const Fiber& f) {
  const uint3 b = f.idx.block, t = f.idx.thread;
  return fmt("thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)", t.x, t.y, t.z, f.warp,
             f.lane, b.x, b.y, b.z);
}

// Records the launch's first error. In a fiber it never returns: the fiber is abandoned.
void fail(cudaError_t code, const std::string& msg) {
  Launch& L = *tls_launch;
  if (!L.failed) {
    L.failed = true;
    L.code = code;
    L.report = msg;
  }
  if (Fiber* f = tls_fiber) {
    f->state = St::Done;
    swapcontext(&f->ctx, &L.sched);
    std::abort();  // an abandoned fiber is never resumed
  }
}

void block_wait(Fiber& f, Wait w, const char* what, Site s) {
  f.state = St::Blocked;
  f.wait = w;
  f.what = what;
  f.site = s;
  swapcontext(&f.ctx, &tls_launch->sched);
  f.wait = Wait::None;
}

// ---- happens-before and the shadow --------------------------------------------------------------
// An access record (thread t, barrier interval e, t's own clock c) happens before the current
// access of thread u when a __syncthreads lies between them (e < now), when t == u, or when t is
// in u's warp and a __syncwarp taught u t's clock c (c <= u.wvc[lane t]). Shuffles, votes,
// ldmatrix and mma order no memory, as in CUDA's memory model.
bool hb(const Launch& L, int t, uint32_t e, uint32_t c, const Fiber& u) {
  if (e < L.bepoch || t == u.tid) return true;
  return t / 32 == u.warp && c <= u.wvc[t % 32];
}

enum class Acc { Read, Write, Atomic };

// Checks and records an access of n bytes at p by fiber f. Returns false when p is not shared.
bool access(Fiber& f, const void* pv, size_t n, Acc k, const char* what, const void* pc) {
  Launch& L = *tls_launch;
  Arena& A = g_arena;
  const auto* p = static_cast<const unsigned char*>(pv);
  if (p + n <= A.lo || p >= A.hi) return false;
  const auto off = static_cast<ptrdiff_t>(p - A.base);
  const auto end = off + static_cast<ptrdiff_t>(n);
  const bool in_static = off >= 0 && end <= ptrdiff_t(L.static_used);
  const bool in_dyn = off >= ptrdiff_t(kStaticCap) && end <= ptrdiff_t(kStaticCap + L.dyn);
  const char* verb = k == Acc::Read ? "read" : k == Acc::Write ? "write" : "atomic";
  if (!in_static && !in_dyn) {
    std::string where;
    if (off >= ptrdiff_t(kStaticCap))
      where = fmt("at byte %td of the %zu-byte dynamic shared memory", off - ptrdiff_t(kStaticCap),
                  L.dyn);
    else if (off >= ptrdiff_t(L.static_used))
      where = fmt("%td bytes before the dynamic shared memory (past the %zu static bytes)",
                  ptrdiff_t(kStaticCap) - off, L.static_used);
    else if (off >= 0)
      where = fmt("at byte %td of the static shared memory, which holds %zu bytes", off,
                  L.static_used);
    else
      where = fmt("%td bytes before the static shared memory", -off);
    fail(cudaErrorIllegalAddress,
         fmt("out-of-bounds shared %s of %zu bytes %s, by %s in %s (%s)", verb, n, where.c_str(),
             who(f).c_str(), what, code_str(pc).c_str()));
  }
  for (size_t i = 0; i < n; ++i) {
    Cell& c = A.shadow[size_t(off) + i];
    const size_t byte = size_t(off) + i - (in_dyn ? kStaticCap : 0);
    const char* space = in_dyn ? "dynamic" : "static";
    auto race = [&](const char* kind, int other, const char* other_code) {
      fail(cudaErrorLaunchFailure,
           fmt("shared memory race (%s) at byte %zu of %s shared memory: %s by %s in %s (%s) "
               "and an access by thread %d (warp %d lane %d)%s%s with no barrier between them",
               kind, byte, space, verb, who(f).c_str(), what, code_str(pc).c_str(), other,
               other / 32, other % 32, other_code ? " in " : "", other_code ? other_code : ""));
    };
    if (c.flags & kInflight)
      fail(cudaErrorLaunchFailure,
           fmt("%s by %s in %s (%s) of byte %zu of %s shared memory, which a cp.async of thread "
               "%d is still writing: it lands only after that thread's cp.async.wait_group",
               verb, who(f).c_str(), what, code_str(pc).c_str(), byte, space, c.w_tid));
    const bool wrote_here = (c.flags & kWritten) && !hb(L, c.w_tid, c.w_epoch, c.w_c, f);
    const bool both_atomic = k == Acc::Atomic && (c.flags & kAtomicW);
    if (k != Acc::Write) {  // a read, or the read of an atomic
      if (!(c.flags & kWritten))
        fail(cudaErrorLaunchFailure,
             fmt("read of uninitialised shared memory: byte %zu of %s shared memory, by %s in %s "
                 "(%s); nothing wrote it in this block",
                 byte, space, who(f).c_str(), what, code_str(pc).c_str()));
      if (wrote_here && !both_atomic) {
        const std::string wc = code_str(c.w_pc);
        race("read after write", c.w_tid, wc.c_str());
      }
    }
    if (k != Acc::Read) {
      if (wrote_here && !both_atomic) {
        const std::string wc = code_str(c.w_pc);
        race("write after write", c.w_tid, wc.c_str());
      }
      if (c.r_epoch == L.bepoch && !(c.r_warp == f.warp && c.r_lanes < 0 && c.r_tid == f.tid)) {
        if (c.r_warp != f.warp) race("write after read", c.r_warp == -2 ? -1 : c.r_tid, nullptr);
        if (c.r_lanes < 0) {
          if (!hb(L, c.r_tid, c.r_epoch, c.r_c, f)) race("write after read", c.r_tid, nullptr);
        } else {
          const auto& lanes = A.lanes[size_t(c.r_lanes)];
          for (int l = 0; l < 32; ++l)
            if (l != f.lane && lanes[size_t(l)] > f.wvc[l])
              race("write after read", f.warp * 32 + l, nullptr);
        }
      }
      c.flags = uint8_t((c.flags | kWritten) & ~kAtomicW) | (k == Acc::Atomic ? kAtomicW : 0);
      c.w_epoch = L.bepoch;
      c.w_c = f.wvc[f.lane];
      c.w_tid = int16_t(f.tid);
      c.w_pc = pc;
    } else {  // record the read (atomics conflict only with plain accesses)
      const uint32_t mine = f.wvc[f.lane];
      if (c.r_epoch != L.bepoch) {
        c.r_epoch = L.bepoch;
        c.r_warp = int16_t(f.warp);
        c.r_tid = int16_t(f.tid);
        c.r_c = mine;
        c.r_lanes = -1;
      } else if (c.r_warp == f.warp) {
        if (c.r_lanes < 0 && c.r_tid == f.tid) {
          c.r_c = mine;
        } else {
          if (c.r_lanes < 0) {
            c.r_lanes = int32_t(A.lanes.size());
            A.lanes.emplace_back();
            A.lanes.back().fill(0);
            A.lanes.back()[size_t(c.r_tid % 32)] = c.r_c;
          }
          A.lanes[size_t(c.r_lanes)][size_t(f.lane)] = mine;
        }
      } else {
        c.r_warp = -2;  // several warps: any write before the next barrier races
        c.r_tid = int16_t(f.tid);
      }
    }
  }
  return true;
}

bool is_shared(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= g_arena.lo && q < g_arena.hi;
}

void ensure_arena() {
  if (g_arena.base) return;
  const size_t total = kRed + kStaticCap + kDynCap + kRed;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) std::abort();
  g_arena.lo = static_cast<unsigned char*>(m);
  g_arena.base = g_arena.lo + kRed;
  g_arena.hi = g_arena.lo + total;
  g_arena.shadow.resize(kStaticCap + kDynCap);
}

// ---- the scheduler ------------------------------------------------------------------------------
void fiber_exit(Fiber& f) {
  Launch& L = *tls_launch;
  if (L.arrived > 0)
    fail(cudaErrorLaunchFailure,
         fmt("%s exited while %d threads wait at %s (%s): on a GPU the block deadlocks (a "
             "barrier in divergent code)",
             who(f).c_str(), L.arrived, L.bwhat, site_str(L.bsite).c_str()));
  for (const WarpOp& op : L.warps[size_t(f.warp)])
    if (op.mask & (1u << f.lane))
      fail(cudaErrorLaunchFailure,
           fmt("%s exited without reaching %s (%s), which lanes 0x%08x of its warp wait at with "
               "mask 0x%08x",
               who(f).c_str(), op.what, site_str(op.site).c_str(), op.arrived, op.mask));
  ++L.exited;
  L.exited_lanes[size_t(f.warp)] |= 1u << f.lane;
}

void fiber_entry() {
  Launch& L = *tls_launch;
  Fiber& f = *tls_fiber;
  L.body(L.arg);
  fiber_exit(f);
  f.state = St::Done;
  swapcontext(&f.ctx, &L.sched);
  std::abort();
}

std::string describe_waits(const Launch& L) {
  std::map<std::string, std::vector<int>> groups;
  for (const Fiber& f : L.fibers)
    if (f.state == St::Blocked)
      groups[fmt("%s (%s)", f.what, site_str(f.site).c_str())].push_back(f.tid);
  std::string s;
  for (auto& [k, v] : groups) {
    s += fmt("; %zu threads wait at %s (threads %d", v.size(), k.c_str(), v[0]);
    if (v.size() > 1) s += fmt("..%d", v.back());
    s += ")";
  }
  return s;
}

void run_block(Launch& L, uint3 b) {
  Arena& A = g_arena;
  std::memset(A.base, kPoison, kStaticCap);
  std::memset(A.base + kStaticCap, kPoison, L.dyn);
  std::memset(static_cast<void*>(A.shadow.data()), 0, sizeof(Cell) * (kStaticCap + L.dyn));
  for (Cell& c : A.shadow) c.r_lanes = -1;
  A.lanes.clear();
  L.bepoch = 1;
  L.arrived = L.exited = 0;
  for (auto& w : L.warps) w.clear();
  std::fill(L.exited_lanes.begin(), L.exited_lanes.end(), 0u);
  const dim3 bd = L.block;
  for (int t = 0; t < L.nthreads; ++t) {
    Fiber& f = L.fibers[size_t(t)];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.idx.thread = uint3{unsigned(t) % bd.x, unsigned(t) / bd.x % bd.y, unsigned(t) / (bd.x * bd.y)};
    f.idx.block = b;
    f.idx.block_dim = L.block;
    f.idx.grid_dim = L.grid;
    f.state = St::Ready;
    f.wait = Wait::None;
    std::fill(std::begin(f.wvc), std::end(f.wvc), 0u);
    f.wvc[f.lane] = 1;
    f.pending.clear();
    f.committed = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = g_stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool ran = false, live = false;
    for (Fiber& f : L.fibers) {
      if (f.state != St::Ready) continue;
      ran = true;
      tls_fiber = &f;
      tls_indices = &f.idx;
      swapcontext(&L.sched, &f.ctx);
      tls_fiber = nullptr;
      tls_indices = nullptr;
      if (L.failed) return;
    }
    for (const Fiber& f : L.fibers) live |= f.state != St::Done;
    if (!live) return;
    if (!ran) {
      fail(cudaErrorLaunchFailure,
           fmt("deadlock in block (%u,%u,%u): every live thread waits%s", b.x, b.y, b.z,
               describe_waits(L).c_str()));
      return;
    }
  }
}

// ---- warp collectives ---------------------------------------------------------------------------
// Joins the warp collective of this lane (opening it if it is the first); true for the last lane
// to arrive, which then computes the results of every lane and calls release().
bool arrive(Fiber& f, Op kind, int key, unsigned mask, const char* what, Site s) {
  Launch& L = *tls_launch;
  const unsigned bit = 1u << f.lane;
  const int first = f.warp * 32;
  const int lanes = std::min(32, L.nthreads - first);
  const unsigned exist = lanes == 32 ? ~0u : (1u << lanes) - 1;
  if (!(mask & bit))
    fail(cudaErrorLaunchFailure, fmt("%s (%s) by %s, which is not in its mask 0x%08x", what,
                                     site_str(s).c_str(), who(f).c_str(), mask));
  if (mask & ~exist)
    fail(cudaErrorLaunchFailure,
         fmt("%s (%s) by %s: mask 0x%08x names lanes 0x%08x that the block does not have", what,
             site_str(s).c_str(), who(f).c_str(), mask, mask & ~exist));
  if (mask & L.exited_lanes[size_t(f.warp)])
    fail(cudaErrorLaunchFailure,
         fmt("%s (%s) by %s: mask 0x%08x names lanes 0x%08x that have exited", what,
             site_str(s).c_str(), who(f).c_str(), mask, mask & L.exited_lanes[size_t(f.warp)]));
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && L.fibers[size_t(first + l)].wait == Wait::Barrier)
      fail(cudaErrorLaunchFailure,
           fmt("%s (%s) by %s with mask 0x%08x: lane %d of the mask waits at %s (%s) instead",
               what, site_str(s).c_str(), who(f).c_str(), mask, l, L.bwhat,
               site_str(L.bsite).c_str()));
  auto& ops = L.warps[size_t(f.warp)];
  WarpOp* op = nullptr;
  for (WarpOp& o : ops) {
    if (!(o.mask & mask)) continue;
    if (o.kind != kind || o.key != key || o.mask != mask || !same_site(o.site, s) ||
        !(o.mask & bit))
      fail(cudaErrorLaunchFailure,
           fmt("%s (%s) by %s with mask 0x%08x, while lanes 0x%08x of its warp wait at %s (%s) "
               "with mask 0x%08x: a collective that only part of its mask reaches",
               what, site_str(s).c_str(), who(f).c_str(), mask, o.arrived, o.what,
               site_str(o.site).c_str(), o.mask));
    op = &o;
  }
  if (op == nullptr) {
    ops.push_back(WarpOp{kind, key, mask, 0u, what, s});
    op = &ops.back();
  }
  op->arrived |= bit;
  return op->arrived == op->mask;
}

void release(Fiber& f, unsigned mask) {
  Launch& L = *tls_launch;
  auto& ops = L.warps[size_t(f.warp)];
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i].mask == mask && (ops[i].mask & (1u << f.lane))) {
      ops.erase(ops.begin() + ptrdiff_t(i));
      break;
    }
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && l != f.lane) {
      Fiber& o = L.fibers[size_t(f.warp * 32 + l)];
      o.state = St::Ready;
      o.wait = Wait::None;
    }
}

Fiber& lane_fiber(const Fiber& f, int l) {
  return tls_launch->fibers[size_t(f.warp * 32 + l)];
}

Fiber& current(const char* what, Site s) {
  if (tls_fiber == nullptr) {
    std::fprintf(stderr, "reco emulation: %s (%s) called outside a kernel\n", what,
                 site_str(s).c_str());
    std::abort();
  }
  return *tls_fiber;
}

bool pow2_width(int w) { return w >= 1 && w <= 32 && (w & (w - 1)) == 0; }

// The source lane of a shuffle (PTX shfl.sync with c = ((32 - width) << 8) | clamp), or the
// lane itself where the source falls outside the lane's segment.
int shfl_source(Shfl m, int lane, int b, int width) {
  const int segmask = 32 - width;  // the bits of the lane id that name the segment
  const int min_lane = lane & segmask;
  const int max_lane = m == Shfl::Up ? min_lane : (min_lane | (31 & ~segmask));
  int j = 0;
  bool ok = false;
  switch (m) {
    case Shfl::Up: j = lane - b, ok = j >= max_lane; break;
    case Shfl::Down: j = lane + b, ok = j <= max_lane; break;
    case Shfl::Xor: j = lane ^ (b & 31), ok = j <= max_lane; break;
    case Shfl::Idx: j = min_lane | (b & 31 & ~segmask), ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}

// ---- mma ----------------------------------------------------------------------------------------
double half_to_double(uint32_t h) {
  const uint32_t sign = h & 0x8000u, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  double v;
  if (exp == 0x1f) v = mant ? NAN : INFINITY;
  else if (exp == 0) v = std::ldexp(double(mant), -24);
  else v = std::ldexp(double(mant | 0x400u), int(exp) - 25);
  return sign ? -v : v;
}
double bf16_to_double(uint32_t b) { return double(from_bits<float>(b << 16)); }

}  // namespace

// ---- public entry points ----------------------------------------------------------------------
const Arch& arch() {
  const Arch* a = current_arch();
  return a ? *a : kSm90;
}
bool set_arch(const char* name) {
  if (std::strcmp(name, "sm_80") == 0) g_arch = &kSm80;
  else if (std::strcmp(name, "sm_90") == 0) g_arch = &kSm90;
  else return false;
  return true;
}
void set_kernel_info(const void* kernel, int registers, size_t static_smem) {
  std::lock_guard<std::mutex> lock(g_mutex);
  KernelInfo& k = g_kernels[kernel];
  k.regs = registers;
  if (static_smem != size_t(-1)) {
    k.static_given = true;
    k.static_smem = static_smem;
  }
}
const char* last_report() { return tls_report.c_str(); }

int block_barrier(Reduce r, int pred, const char* what, Site s) {
  Fiber& f = current(what, s);
  Launch& L = *tls_launch;
  if (L.exited > 0)
    fail(cudaErrorLaunchFailure,
         fmt("%s (%s) by %s after %d threads of the block exited: they never arrive, so on a GPU "
             "the block deadlocks (a barrier in divergent code)",
             what, site_str(s).c_str(), who(f).c_str(), L.exited));
  for (const WarpOp& op : L.warps[size_t(f.warp)])
    if ((op.mask & (1u << f.lane)) && !(op.arrived & (1u << f.lane)))
      fail(cudaErrorLaunchFailure,
           fmt("%s (%s) by %s, while lanes 0x%08x of its warp wait for it at %s (%s)", what,
               site_str(s).c_str(), who(f).c_str(), op.arrived, op.what,
               site_str(op.site).c_str()));
  if (L.arrived == 0) {
    L.bsite = s;
    L.bwhat = what;
    L.red = r;
    L.acc = r == Reduce::And ? 1 : 0;
  } else if (!same_site(L.bsite, s) || std::strcmp(L.bwhat, what) != 0) {
    fail(cudaErrorLaunchFailure,
         fmt("divergent barrier: %s reached %s (%s) while %d threads wait at %s (%s)",
             who(f).c_str(), what, site_str(s).c_str(), L.arrived, L.bwhat,
             site_str(L.bsite).c_str()));
  }
  switch (r) {
    case Reduce::Or: L.acc |= pred != 0; break;
    case Reduce::And: L.acc &= pred != 0; break;
    case Reduce::Count: L.acc += pred != 0; break;
    case Reduce::None: break;
  }
  if (++L.arrived == L.nthreads) {
    L.arrived = 0;
    ++L.bepoch;
    for (Fiber& o : L.fibers) {
      o.out[0] = uint32_t(L.acc);
      o.wait = Wait::None;
      if (&o != &f) o.state = St::Ready;
    }
    return L.acc;
  }
  block_wait(f, Wait::Barrier, what, s);
  return int(f.out[0]);
}

void warp_sync(unsigned mask, Site s) {
  Fiber& f = current("__syncwarp", s);
  if (!arrive(f, Op::Sync, 0, mask, "__syncwarp", s)) return block_wait(f, Wait::Warp, "__syncwarp", s);
  uint32_t join[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l))
      for (int j = 0; j < 32; ++j) join[j] = std::max(join[j], lane_fiber(f, l).wvc[j]);
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) {
      Fiber& o = lane_fiber(f, l);
      std::copy(std::begin(join), std::end(join), o.wvc);
      ++o.wvc[l];
    }
  release(f, mask);
}

unsigned warp_vote(Vote v, unsigned mask, int pred, Site s) {
  static const char* names[] = {"__ballot_sync", "__any_sync", "__all_sync"};
  const char* what = names[int(v)];
  Fiber& f = current(what, s);
  f.in = pred != 0;
  if (!arrive(f, Op::Vote, int(v), mask, what, s)) {
    block_wait(f, Wait::Warp, what, s);
    return f.out[0];
  }
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && lane_fiber(f, l).in) ballot |= 1u << l;
  const unsigned r = v == Vote::Ballot ? ballot : v == Vote::Any ? ballot != 0 : ballot == mask;
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) lane_fiber(f, l).out[0] = r;
  release(f, mask);
  return r;
}

uint64_t warp_shfl(Shfl m, unsigned mask, uint64_t bits, int operand, int width, Site s) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync"};
  const char* what = names[int(m)];
  Fiber& f = current(what, s);
  if (!pow2_width(width))
    fail(cudaErrorLaunchFailure, fmt("%s (%s) by %s: width %d is not a power of two in 1..32",
                                     what, site_str(s).c_str(), who(f).c_str(), width));
  f.in = bits;
  f.arg = operand;
  f.width = width;
  if (!arrive(f, Op::Shfl, int(m) * 64 + width, mask, what, s)) {
    block_wait(f, Wait::Warp, what, s);
    return f.out64;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    Fiber& o = lane_fiber(f, l);
    const int j = shfl_source(m, l, o.arg, width);
    if (!(mask & (1u << j)))
      fail(cudaErrorLaunchFailure,
           fmt("%s (%s): lane %d reads lane %d, which is not in the mask 0x%08x (an undefined "
               "value on a GPU)",
               what, site_str(s).c_str(), l, j, mask));
    o.out64 = lane_fiber(f, j).in;
  }
  release(f, mask);
  return f.out64;
}

unsigned active_mask() {
  Fiber& f = current("__activemask", Site{"?", 0});
  const Launch& L = *tls_launch;
  const int lanes = std::min(32, L.nthreads - f.warp * 32);
  const unsigned exist = lanes == 32 ? ~0u : (1u << lanes) - 1;
  return exist & ~L.exited_lanes[size_t(f.warp)];
}

uint32_t atomic32(void* p, Rmw op, uint32_t v, uint32_t cmp, bool is_signed, bool is_float,
                  Site s) {
  if (tls_fiber) {
    if (reinterpret_cast<uintptr_t>(p) % 4)
      fail(cudaErrorMisalignedAddress, fmt("atomic on a misaligned address (%s) by %s",
                                           site_str(s).c_str(), who(*tls_fiber).c_str()));
    access(*tls_fiber, p, 4, Acc::Atomic, "an atomic", __builtin_return_address(0));
  }
  uint32_t old;
  std::memcpy(&old, p, 4);
  uint32_t r = old;
  switch (op) {
    case Rmw::Add:
      r = is_float ? uint32_t(to_bits(from_bits<float>(old) + from_bits<float>(v))) : old + v;
      break;
    case Rmw::Or: r = old | v; break;
    case Rmw::And: r = old & v; break;
    case Rmw::Xor: r = old ^ v; break;
    case Rmw::Max:
      r = is_signed ? (int32_t(v) > int32_t(old) ? v : old) : std::max(v, old);
      break;
    case Rmw::Min:
      r = is_signed ? (int32_t(v) < int32_t(old) ? v : old) : std::min(v, old);
      break;
    case Rmw::Exch: r = v; break;
    case Rmw::Cas: r = old == cmp ? v : old; break;
  }
  std::memcpy(p, &r, 4);
  return old;
}

uint64_t atomic64(void* p, Rmw op, uint64_t v, uint64_t cmp, bool, Site s) {
  if (tls_fiber) {
    if (reinterpret_cast<uintptr_t>(p) % 8)
      fail(cudaErrorMisalignedAddress, fmt("atomic on a misaligned address (%s) by %s",
                                           site_str(s).c_str(), who(*tls_fiber).c_str()));
    access(*tls_fiber, p, 8, Acc::Atomic, "an atomic", __builtin_return_address(0));
  }
  uint64_t old;
  std::memcpy(&old, p, 8);
  const uint64_t r = op == Rmw::Add ? old + v : op == Rmw::Cas ? (old == cmp ? v : old) : v;
  std::memcpy(p, &r, 8);
  return old;
}

unsigned char* dynamic_shared(const char* kernel) {
  if (tls_launch != nullptr && kernel != nullptr && tls_launch->name == nullptr)
    tls_launch->name = kernel;
  return g_arena.base + kStaticCap;
}

std::string take_launch_log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string out;
  for (const std::string& n : g_log) out += n + "\n";
  g_log.clear();
  return out;
}

void* SharedSlot::get(size_t bytes, size_t align, const char* name, Site s) {
  Launch& L = *tls_launch;
  if (launch != L.id) {
    align = std::max<size_t>(align, 4);
    const size_t o = (L.static_used + align - 1) / align * align;
    if (o + bytes > kStaticCap)
      fail(cudaErrorInvalidValue,
           fmt("static shared variable %s (%s) takes the kernel past the 48 KB of static shared "
               "memory",
               name, site_str(s).c_str()));
    L.static_used = o + bytes;
    offset = o;
    launch = L.id;
    const Arch& a = arch();
    KernelInfo& k = *L.info;
    const size_t limit = k.max_dynamic >= 0 ? size_t(k.max_dynamic) : kDefaultSmem - L.static_used;
    if (!k.static_given && (L.static_used + L.dyn > size_t(a.optin_smem) ||
                            (k.max_dynamic < 0 && L.static_used + L.dyn > size_t(kDefaultSmem)) ||
                            L.dyn > limit))
      fail(cudaErrorInvalidValue,
           fmt("launch with %zu bytes of static shared memory (with %s at %s) and %zu dynamic: "
               "over the %s limit (%d bytes with the opt-in, 48 KB without); the real launch "
               "fails before the kernel runs",
               L.static_used, name, site_str(s).c_str(), L.dyn, a.name, a.optin_smem));
  }
  return g_arena.base + offset;
}

void mma_m16n8k16_f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      const float (&c)[4], bool bf16, Site s) {
  const char* what = bf16 ? "mma.m16n8k16.f32.bf16" : "mma.m16n8k16.f32.f16";
  Fiber& f = current(what, s);
  std::copy(a, a + 4, f.regs);
  f.regs[4] = b[0];
  f.regs[5] = b[1];
  for (int i = 0; i < 4; ++i) f.regs[6 + i] = uint32_t(to_bits(c[i]));
  if (arrive(f, Op::Mma16, bf16, ~0u, what, s)) {
    // Fragments (PTX ISA, m16n8k16 with .f16/.bf16): g = lane / 4, t = lane % 4.
    // A: register j holds a_{2j}, a_{2j+1} (low half first); a_i is row g (+8 when i % 4 >= 2),
    //    column 2t + i % 2 (+8 when i >= 4). B: b_i is row 2t + i % 2 (+8 when i >= 2), column
    //    g. C, D: c_i is row g (+8 when i >= 2), column 2t + i % 2.
    double A[16][16], B[16][8], C[16][8];
    auto cvt = bf16 ? bf16_to_double : half_to_double;
    for (int l = 0; l < 32; ++l) {
      const Fiber& o = lane_fiber(f, l);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 8; ++i) {
        const uint32_t h = (o.regs[i / 2] >> (16 * (i % 2))) & 0xffffu;
        A[g + (i % 4 >= 2 ? 8 : 0)][2 * t + i % 2 + (i >= 4 ? 8 : 0)] = cvt(h);
      }
      for (int i = 0; i < 4; ++i) {
        const uint32_t h = (o.regs[4 + i / 2] >> (16 * (i % 2))) & 0xffffu;
        B[2 * t + i % 2 + (i >= 2 ? 8 : 0)][g] = cvt(h);
      }
      for (int i = 0; i < 4; ++i)
        C[g + (i >= 2 ? 8 : 0)][2 * t + i % 2] = double(from_bits<float>(o.regs[6 + i]));
    }
    // Every product is exact in float64; the sum runs in float64 from C over k = 0..15 and is
    // rounded to float32 once (NVIDIA leaves the order and the internal precision unspecified).
    for (int l = 0; l < 32; ++l) {
      Fiber& o = lane_fiber(f, l);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        o.out[i] = uint32_t(to_bits(float(acc)));
      }
    }
    release(f, ~0u);
  } else {
    block_wait(f, Wait::Warp, what, s);
  }
  for (int i = 0; i < 4; ++i) d[i] = from_bits<float>(f.out[i]);
}

void mma_m16n8k32_s32(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      const int (&c)[4], Site s) {
  const char* what = "mma.m16n8k32.s32.s8";
  Fiber& f = current(what, s);
  std::copy(a, a + 4, f.regs);
  f.regs[4] = b[0];
  f.regs[5] = b[1];
  for (int i = 0; i < 4; ++i) f.regs[6 + i] = uint32_t(c[i]);
  if (arrive(f, Op::Mma32, 0, ~0u, what, s)) {
    // Fragments (PTX ISA, m16n8k32 with .s8): register j holds a_{4j..4j+3} (lowest byte
    // first); a_i is row g (+8 when i % 8 >= 4), column 4t + i % 4 (+16 when i >= 8).
    // B: b_i is row 4t + i % 4 (+16 when i >= 4), column g. C, D as for m16n8k16.
    int32_t A[16][32], B[32][8];
    uint32_t C[16][8];
    for (int l = 0; l < 32; ++l) {
      const Fiber& o = lane_fiber(f, l);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 16; ++i)
        A[g + (i % 8 >= 4 ? 8 : 0)][4 * t + i % 4 + (i >= 8 ? 16 : 0)] =
            int8_t(uint8_t(o.regs[i / 4] >> (8 * (i % 4))));
      for (int i = 0; i < 8; ++i)
        B[4 * t + i % 4 + (i >= 4 ? 16 : 0)][g] = int8_t(uint8_t(o.regs[4 + i / 4] >> (8 * (i % 4))));
      for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + i % 2] = o.regs[6 + i];
    }
    // Exact products; the int32 sum wraps modulo 2^32 (no .satfinite).
    for (int l = 0; l < 32; ++l) {
      Fiber& o = lane_fiber(f, l);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
        uint32_t acc = C[row][col];
        for (int k = 0; k < 32; ++k) acc += uint32_t(A[row][k] * B[k][col]);
        o.out[i] = acc;
      }
    }
    release(f, ~0u);
  } else {
    block_wait(f, Wait::Warp, what, s);
  }
  for (int i = 0; i < 4; ++i) d[i] = int(f.out[i]);
}

void ldmatrix(int count, bool trans, uint32_t* regs, const void* addr, Site s) {
  static const char* names[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  const char* what = names[trans][count];
  Fiber& f = current(what, s);
  f.ptr = addr;
  if (arrive(f, Op::Ldm, count * 2 + trans, ~0u, what, s)) {
    // Lane 8m + r gives the address of row r (16 bytes: eight b16) of matrix m. Without .trans,
    // lane l receives in register m elements 2(l%4), 2(l%4)+1 of row l/4 of matrix m; with
    // .trans, element l/4 of rows 2(l%4) and 2(l%4)+1.
    for (int q = 0; q < 8 * count; ++q) {
      Fiber& o = lane_fiber(f, q);
      if (reinterpret_cast<uintptr_t>(o.ptr) % 16)
        fail(cudaErrorMisalignedAddress,
             fmt("%s (%s): lane %d's row address is not 16-byte aligned", what,
                 site_str(s).c_str(), q));
      if (!access(o, o.ptr, 16, Acc::Read, what, nullptr))
        fail(cudaErrorIllegalAddress, fmt("%s (%s): lane %d's row address is not shared memory",
                                          what, site_str(s).c_str(), q));
    }
    auto elem = [&](int m, int r, int c) {
      uint16_t v;
      std::memcpy(&v, static_cast<const unsigned char*>(lane_fiber(f, 8 * m + r).ptr) + 2 * c, 2);
      return uint32_t(v);
    };
    for (int l = 0; l < 32; ++l)
      for (int m = 0; m < count; ++m) {
        const int g = l / 4, t = l % 4;
        lane_fiber(f, l).out[m] = trans ? elem(m, 2 * t, g) | elem(m, 2 * t + 1, g) << 16
                                        : elem(m, g, 2 * t) | elem(m, g, 2 * t + 1) << 16;
      }
    release(f, ~0u);
  } else {
    block_wait(f, Wait::Warp, what, s);
  }
  std::copy(f.out, f.out + count, regs);
}

void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, Site s) {
  const char* what = cg ? "cp.async.cg" : "cp.async.ca";
  Fiber& f = current(what, s);
  if (!(cp_size == 4 || cp_size == 8 || cp_size == 16) || (cg && cp_size != 16) || src_size < 0 ||
      src_size > cp_size)
    fail(cudaErrorLaunchFailure, fmt("%s (%s) by %s: cp-size %d, src-size %d is no valid form",
                                     what, site_str(s).c_str(), who(f).c_str(), cp_size, src_size));
  if (reinterpret_cast<uintptr_t>(dst) % unsigned(cp_size) ||
      reinterpret_cast<uintptr_t>(src) % unsigned(cp_size))
    fail(cudaErrorMisalignedAddress,
         fmt("%s (%s) by %s: addresses not aligned to %d bytes", what, site_str(s).c_str(),
             who(f).c_str(), cp_size));
  if (!access(f, dst, size_t(cp_size), Acc::Write, what, nullptr))
    fail(cudaErrorIllegalAddress, fmt("%s (%s) by %s: the destination is not shared memory", what,
                                      site_str(s).c_str(), who(f).c_str()));
  Pending p{static_cast<unsigned char*>(dst), cp_size, f.committed, s, {}};
  std::memcpy(p.data, src, size_t(src_size));  // bytes past src-size are zero-filled
  f.pending.push_back(p);
  const size_t off = size_t(p.dst - g_arena.base);
  for (int i = 0; i < cp_size; ++i) g_arena.shadow[off + size_t(i)].flags |= kInflight;
  std::memset(dst, kPoison, size_t(cp_size));
}

void cp_async_commit(Site s) { ++current("cp.async.commit_group", s).committed; }

void cp_async_wait(int pending, Site s) {
  Fiber& f = current("cp.async.wait_group", s);
  const Launch& L = *tls_launch;
  std::vector<Pending> keep;
  for (const Pending& p : f.pending) {
    if (p.group >= f.committed - pending) {
      keep.push_back(p);
      continue;
    }
    std::memcpy(p.dst, p.data, size_t(p.size));
    const size_t off = size_t(p.dst - g_arena.base);
    for (int i = 0; i < p.size; ++i) {  // the write lands now, in this thread's program order
      Cell& c = g_arena.shadow[off + size_t(i)];
      c.flags = uint8_t(c.flags & ~kInflight);
      c.w_epoch = L.bepoch;
      c.w_c = f.wvc[f.lane];
    }
  }
  f.pending.swap(keep);
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute a, int value) {
  const Arch* ar = current_arch();
  if (ar == nullptr) return tls_error = cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(g_mutex);
  KernelInfo& k = g_kernels[kernel];
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) + k.static_smem > size_t(ar->optin_smem))
      return tls_error = cudaErrorInvalidValue;
    k.max_dynamic = value;
    return cudaSuccess;
  }
  if (a == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return tls_error = cudaErrorInvalidValue;
}

cudaError_t func_get_attributes(cudaFuncAttributes* out, const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const KernelInfo& k = g_kernels[kernel];
  *out = cudaFuncAttributes{};
  out->sharedSizeBytes = k.static_smem;
  out->maxThreadsPerBlock = 1024;
  out->numRegs = k.regs;
  out->ptxVersion = out->binaryVersion = current_arch() ? arch().major * 10 : 0;
  out->maxDynamicSharedSizeBytes =
      k.max_dynamic >= 0 ? k.max_dynamic : int(kDefaultSmem - k.static_smem);
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dyn, void (*body)(void*),
                     void* arg) {
  std::lock_guard<std::mutex> lock(g_mutex);
  tls_report.clear();
  tls_report_code = cudaSuccess;
  auto reject = [](cudaError_t e, std::string msg) {
    tls_report = std::move(msg);
    tls_report_code = e;
    return tls_error = e;
  };
  const Arch* ar = current_arch();
  if (ar == nullptr) return reject(cudaErrorInvalidDevice, "RECO_EMULATE_CUDA names no known GPU");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024)
    return reject(cudaErrorInvalidConfiguration,
                  fmt("block (%u,%u,%u): at most 1024 threads, (1024,1024,64) per dimension",
                      block.x, block.y, block.z));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    return reject(cudaErrorInvalidConfiguration,
                  fmt("grid (%u,%u,%u): at most (2^31-1,65535,65535), none zero", grid.x, grid.y,
                      grid.z));
  KernelInfo& k = g_kernels[kernel];
  const size_t limit = k.max_dynamic >= 0 ? size_t(k.max_dynamic) : kDefaultSmem - k.static_smem;
  if (dyn > limit || k.static_smem + dyn > size_t(ar->optin_smem))
    return reject(cudaErrorInvalidValue,
                  fmt("%zu bytes of dynamic shared memory (with %zu static): over the kernel's "
                      "limit of %zu (cudaFuncAttributeMaxDynamicSharedMemorySize; at most %d "
                      "bytes with static on %s, 48 KB without the opt-in)",
                      dyn, k.static_smem, limit, ar->optin_smem, ar->name));
  const int warps = int((threads + 31) / 32);
  if (k.regs > 255)
    return reject(cudaErrorLaunchOutOfResources, fmt("%d registers per thread: at most 255", k.regs));
  if (k.regs > 0) {
    const int per_warp = (k.regs * 32 + 255) / 256 * 256;  // allocated per warp, 256 at a time
    if (int64_t(per_warp) * warps > ar->regs_per_block)
      return reject(cudaErrorLaunchOutOfResources,
                    fmt("%d registers per thread x %d warps: over the %d registers of a block",
                        k.regs, warps, ar->regs_per_block));
  }
  ensure_arena();
  const size_t stack = 256 * 1024;
  if (g_stack_bytes == 0) g_stack_bytes = stack;
  while (g_stacks.size() < threads) {  // each with a guard page below it
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, stack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) std::abort();
    mprotect(m, page, PROT_NONE);
    g_stacks.push_back(static_cast<char*>(m) + page);
  }
  Launch L;
  L.id = ++g_launch_ids;
  L.kernel = kernel;
  L.info = &k;
  L.grid = grid;
  L.block = block;
  L.dyn = dyn;
  L.static_used = 0;
  L.nthreads = int(threads);
  L.nwarps = warps;
  L.fibers.resize(threads);
  for (size_t t = 0; t < threads; ++t) L.fibers[t].stack = g_stacks[t];
  L.warps.resize(size_t(warps));
  L.exited_lanes.resize(size_t(warps));
  L.body = body;
  L.arg = arg;
  Launch* outer = tls_launch;
  tls_launch = &L;
  for (unsigned z = 0; z < grid.z && !L.failed; ++z)
    for (unsigned y = 0; y < grid.y && !L.failed; ++y)
      for (unsigned x = 0; x < grid.x && !L.failed; ++x) run_block(L, uint3{x, y, z});
  tls_launch = outer;
  if (g_log.size() >= 4096) g_log.erase(g_log.begin());
  g_log.emplace_back(L.name != nullptr ? L.name : "?");
  if (!k.static_given) k.static_smem = std::max(k.static_smem, L.static_used);
  if (L.failed) {
    if (std::getenv("RECO_EMU_VERBOSE")) std::fprintf(stderr, "reco emulation: %s\n", L.report.c_str());
    return reject(L.code, L.report);
  }
  return cudaSuccess;
}

}  // namespace reco::emu

using namespace reco::emu;

const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && e == tls_report_code && !tls_report.empty()) {
    tls_report_full = std::string(plain_string(e)) + " (emulation: " + tls_report + ")";
    return tls_report_full.c_str();
  }
  return plain_string(e);
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = tls_error;
  tls_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return tls_error; }
namespace {
thread_local int tls_device = 0;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = current_arch() ? kDevices : 0;
  return current_arch() ? cudaSuccess : (tls_error = cudaErrorInvalidDevice);
}
cudaError_t cudaGetDevice(int* d) {
  *d = tls_device;
  return current_arch() ? cudaSuccess : (tls_error = cudaErrorInvalidDevice);
}
cudaError_t cudaSetDevice(int d) {
  if (!current_arch() || d < 0 || d >= kDevices) return tls_error = cudaErrorInvalidDevice;
  tls_device = d;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  const Arch* ar = current_arch();
  if (ar == nullptr || device < 0 || device >= kDevices) return tls_error = cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = kDefaultSmem; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *v = ar->regs_per_block; break;
    case cudaDevAttrMultiProcessorCount: *v = ar->sms; break;
    case cudaDevAttrComputeCapabilityMajor: *v = ar->major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = ar->minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = ar->smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = ar->optin_smem; break;
    default: return tls_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, n, k);
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { return cudaMemset(p, v, n); }

// ---- the access hooks of -fsanitize=thread ------------------------------------------------------
// The kernels' translation units are instrumented; their loads and stores land here. Only those
// of an emulated thread inside the shared-memory arena are checked.
namespace {
inline void hook(const void* p, size_t n, bool write, const void* pc) {
  if (tls_fiber == nullptr || !is_shared(p)) return;
  access(*tls_fiber, p, n, write ? Acc::Write : Acc::Read, write ? "a store" : "a load", pc);
}
}  // namespace

#define RECO_EMU_HOOKS(n)                                                                      \
  extern "C" void __tsan_read##n(void* p) { hook(p, n, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_write##n(void* p) { hook(p, n, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_read##n(void* p) {                                         \
    hook(p, n, false, __builtin_return_address(0));                                           \
  }                                                                                            \
  extern "C" void __tsan_unaligned_write##n(void* p) {                                        \
    hook(p, n, true, __builtin_return_address(0));                                            \
  }                                                                                            \
  extern "C" void __tsan_volatile_read##n(void* p) {                                          \
    hook(p, n, false, __builtin_return_address(0));                                           \
  }                                                                                            \
  extern "C" void __tsan_volatile_write##n(void* p) {                                         \
    hook(p, n, true, __builtin_return_address(0));                                            \
  }
RECO_EMU_HOOKS(1)
RECO_EMU_HOOKS(2)
RECO_EMU_HOOKS(4)
RECO_EMU_HOOKS(8)
RECO_EMU_HOOKS(16)
#undef RECO_EMU_HOOKS
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  hook(p, n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  hook(p, n, true, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
