// CPU kernels of the mixed node, parameterised by instruction set.
//
// mixed_node_cpu.cpp includes this file twice: once as namespace `generic`
// (the build's baseline flags) and, on x86-64, once as namespace `avx2` with
// every function compiled for AVX2+FMA, picked at run time.  So: no include
// guard, and every function here is marked FM_TARGET.
//
// Layout of the work: a "row" is (k, b, c) and a range of s; the inner loops
// run over s on unit-stride float/double buffers (loaded/converted once per
// row), which gcc vectorises.  A task owns every output element it writes
// (see mixed_node_cpu.cpp), so no atomics are needed.

// Included inside namespace fastmod_mixed_node, after FwdPlan/BwdPlan.
namespace FM_NS {

// Per-node weights as loop-invariant locals.  A zero-weight op is skipped
// entirely (0 * inf must not leak a NaN in): its term is and-ed with an all-0
// bit mask.  Bit masks, not `on ? w * op : 0`, because gcc does not if-convert
// (so does not vectorise) conditional floating-point arithmetic.
template <typename T>
struct Wts {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  T w0, w1, w2, w3, w4, w5;
  U m0, m1, m2, m3, m4, m5;
  FM_TARGET static U mask(T v) { return v != T(0) ? ~U(0) : U(0); }
  FM_TARGET explicit Wts(const T* w)
      : w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]), w4(w[4]), w5(w[5]), m0(mask(w[0])),
        m1(mask(w[1])), m2(mask(w[2])), m3(mask(w[3])), m4(mask(w[4])), m5(mask(w[5])) {}
};

template <typename T, typename U>
FM_INLINE T keep(T v, U m) {
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= m;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// min/max that propagate NaN like torch.minimum/maximum (`|`, not `||`: no
// branches in the vectorised loops).
template <typename T>
FM_INLINE T nmin(T a, T b) { return ((a < b) | (a != a)) ? a : b; }
template <typename T>
FM_INLINE T nmax(T a, T b) { return ((a > b) | (a != a)) ? a : b; }

template <typename T>
FM_INLINE T node_u(T a, T b, const Wts<T>& w) {
  return keep(w.w0 * nmin(a, b), w.m0) + keep(w.w1 * nmax(a, b), w.m1) +
         keep(w.w2 * (a + b), w.m2) + keep(w.w3 * (a * b), w.m3) + keep(w.w4 * a, w.m4) +
         keep(w.w5 * b, w.m5);
}

// A row of x (stride `st` over s) as a T pointer: the tensor itself when it
// already is unit-stride T, else converted into `buf`.  Scalar rows (st == 0)
// give a pointer to one value (the kernels read index 0), unless EXPAND.
template <typename scalar_t, typename T, bool EXPAND = false>
FM_INLINE const T* load_row(const scalar_t* p, int64_t st, int64_t n, T* buf) {
  if (st == 0 && EXPAND) {
    const T v = static_cast<T>(p[0]);
    for (int64_t s = 0; s < n; ++s) buf[s] = v;
    return buf;
  }
  if (st == 0) {
    if constexpr (std::is_same<scalar_t, T>::value) return p;
    buf[0] = static_cast<T>(p[0]);
    return buf;
  }
  if constexpr (std::is_same<scalar_t, T>::value) {
    if (st == 1) return p;
  }
  for (int64_t s = 0; s < n; ++s) buf[s] = static_cast<T>(p[s * st]);
  return buf;
}

template <typename scalar_t, typename T>
FM_INLINE void store_row(scalar_t* dst, const T* src, int64_t n) {
  for (int64_t s = 0; s < n; ++s) dst[s] = static_cast<scalar_t>(src[s]);
}

// ---- forward rows -------------------------------------------------------
enum { FWD_STORE = 0, FWD_SUMSQ = 1, FWD_SCALE = 2 };

template <typename T, bool A1, bool B1, int MODE>
FM_TARGET void fwd_row(int64_t n, const T* __restrict a, const T* __restrict b,
                       const Wts<T>& w, T* __restrict out, T* __restrict ss,
                       const T* __restrict inv) {
  const Wts<T> wl = w;
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) {
    const T u = node_u(A1 ? a[s] : a[0], B1 ? b[s] : b[0], wl);
    if (MODE == FWD_STORE) out[s] = u;
    if (MODE == FWD_SUMSQ) ss[s] += u * u;
    if (MODE == FWD_SCALE) out[s] = u * inv[s];
  }
}

// ---- backward rows ------------------------------------------------------
// Normalise pass 1: ss += u^2, dt += grad * u (over C, per s).
template <typename T, bool A1, bool B1>
FM_TARGET void bwd_stats_row(int64_t n, const T* __restrict a, const T* __restrict b,
                             const T* __restrict g, const Wts<T>& w, T* __restrict ss,
                             T* __restrict dt) {
  const Wts<T> wl = w;
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) {
    const T u = node_u(A1 ? a[s] : a[0], B1 ? b[s] : b[0], wl);
    ss[s] += u * u;
    dt[s] += g[s] * u;
  }
}

// d1[s], d2[s] = dL/dx1, dL/dx2 of this row; r[i] += sum_s du * op_i.
// min/max split the gradient like torch.minimum/maximum: half each on ties,
// and d(min)/da == d(max)/db, d(min)/db == d(max)/da.
template <typename T, bool A1, bool B1, bool NORM>
FM_TARGET void bwd_row(int64_t n, const T* __restrict a, const T* __restrict b,
                       const T* __restrict g, const T* __restrict inv,
                       const T* __restrict coef, const Wts<T>& w, T* __restrict d1,
                       T* __restrict d2, T* r) {
  const Wts<T> wl = w;
  const T c1 = wl.w2 + wl.w4, c2 = wl.w2 + wl.w5;
  T r0 = 0, r1 = 0, r2 = 0, r3 = 0, r4 = 0, r5 = 0;
#pragma omp simd reduction(+ : r0, r1, r2, r3, r4, r5)
  for (int64_t s = 0; s < n; ++s) {
    const T x = A1 ? a[s] : a[0];
    const T y = B1 ? b[s] : b[0];
    T du = g[s];
    if (NORM) du = du * inv[s] - node_u(x, y, wl) * coef[s];
    // 1 if x < y, 0.5 on a tie, 0 if x > y, 1 with a NaN; written as
    // arithmetic on comparisons so that the loop has no branch.
    const T m1 = T(1) - T(0.5) * (T(x >= y) + T(x > y));  // d min/dx1 = d max/dx2
    const T m2 = T(1) - T(0.5) * (T(x <= y) + T(x < y));  // d min/dx2 = d max/dx1
    const T f1 = wl.w0 * m1 + wl.w1 * m2 + c1 + keep(wl.w3 * y, wl.m3);
    const T f2 = wl.w0 * m2 + wl.w1 * m1 + c2 + keep(wl.w3 * x, wl.m3);
    d1[s] = du * f1;
    d2[s] = du * f2;
    r0 += du * nmin(x, y);
    r1 += du * nmax(x, y);
    r2 += du * (x + y);
    r3 += du * (x * y);
    r4 += du * x;
    r5 += du * y;
  }
  r[0] += r0; r[1] += r1; r[2] += r2; r[3] += r3; r[4] += r4; r[5] += r5;
}

template <typename T>
FM_TARGET void add_row(T* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) dst[s] += src[s];
}

template <typename T>
FM_TARGET T sum_row(const T* __restrict src, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t s = 0; s < n; ++s) acc += src[s];
  return acc;
}

// 1 / max(||u||, eps) and, for backward, dot * inv^3 where ||u|| > eps, else 0
// (F.normalize's clamp_min passes no gradient to the norm below eps).
template <typename T>
FM_TARGET void norm_coefs(int64_t n, const T* ss, const T* dt, T* inv, T* coef) {
  const T eps = T(1e-12);
  for (int64_t s = 0; s < n; ++s) {
    const T nrm = std::sqrt(ss[s]);
    const T iv = T(1) / (nrm < eps ? eps : nrm);  // NaN norm stays NaN, as in clamp_min
    inv[s] = iv;
    if (coef) coef[s] = nrm > eps ? dt[s] * iv * iv * iv : T(0);
  }
}

// ---- tasks --------------------------------------------------------------
// Forward task t = ((k * B + b) * nsb + sb): all of C for one s-block.
template <typename scalar_t, typename T, bool A1, bool B1>
FM_TARGET void fwd_tasks(const FwdPlan& p, const scalar_t* x1, const scalar_t* x2,
                         const T* w, scalar_t* out, int64_t t0, int64_t t1, T* scratch) {
  const int64_t L = p.sblk;
  T *abuf = scratch, *bbuf = abuf + L, *obuf = bbuf + L, *ss = obuf + L, *inv = ss + L;
  constexpr bool same = std::is_same<scalar_t, T>::value;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t sb = t % p.nsb, kb = t / p.nsb, k = kb / p.B, b = kb % p.B;
    const int64_t s0 = sb * L, n = std::min(L, p.S - s0);
    const Wts<T> wk(w + 6 * k);
    const scalar_t* r1 = x1 + k * p.st1[0] + b * p.st1[1] + s0 * p.st1[3];
    const scalar_t* r2 = x2 + k * p.st2[0] + b * p.st2[1] + s0 * p.st2[3];
    scalar_t* ro = out + ((k * p.B + b) * p.C) * p.S + s0;
    if (p.normalize) {
      for (int64_t s = 0; s < n; ++s) ss[s] = T(0);
      for (int64_t c = 0; c < p.C; ++c) {
        const T* a = load_row(r1 + c * p.st1[2], p.st1[3], n, abuf);
        const T* bb = load_row(r2 + c * p.st2[2], p.st2[3], n, bbuf);
        fwd_row<T, A1, B1, FWD_SUMSQ>(n, a, bb, wk, nullptr, ss, nullptr);
      }
      norm_coefs<T>(n, ss, nullptr, inv, nullptr);
    }
    for (int64_t c = 0; c < p.C; ++c) {
      const T* a = load_row(r1 + c * p.st1[2], p.st1[3], n, abuf);
      const T* bb = load_row(r2 + c * p.st2[2], p.st2[3], n, bbuf);
      scalar_t* o = ro + c * p.S;
      T* dst = same ? reinterpret_cast<T*>(o) : obuf;
      if (p.normalize)
        fwd_row<T, A1, B1, FWD_SCALE>(n, a, bb, wk, dst, nullptr, inv);
      else
        fwd_row<T, A1, B1, FWD_STORE>(n, a, bb, wk, dst, nullptr, nullptr);
      if (!same) store_row(o, obuf, n);
    }
  }
}

// Backward task t = (((pk * PB + pb) * nsb + sb) * nchunks + j): owned (k, b)
// (or all of a dim that a needed dx is broadcast over, walked serially in
// chunk j), all of C, one s-block walked in sub-blocks of `sub`.  See BwdPlan for where each dx row goes.
template <typename scalar_t, typename T, bool A1, bool B1, bool NORM>
FM_TARGET void bwd_tasks(const BwdPlan& p, const scalar_t* grad, const scalar_t* x1,
                         const scalar_t* x2, const T* w, scalar_t* const* dx,
                         T* const* acc, T* dwpart, int64_t t0, int64_t t1, T* scratch) {
  const int64_t L = p.sub;
  T *abuf = scratch, *bbuf = abuf + L, *gbuf = bbuf + L, *t1buf = gbuf + L, *t2buf = t1buf + L;
  T *ss = t2buf + L, *dt = ss + L, *inv = dt + L, *coef = inv + L;
  constexpr bool same = std::is_same<scalar_t, T>::value;
  T* tmp[2] = {t1buf, t2buf};
  const int64_t nserial = p.SK * p.SB;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t r = t;
    const int64_t j = r % p.nchunks; r /= p.nchunks;
    const int64_t sb = r % p.nsb; r /= p.nsb;
    const int64_t pb = r % p.PB, pk = r / p.PB;
    const int64_t S0 = sb * p.sblk, S1 = std::min(p.S, S0 + p.sblk);
    const int64_t q0 = j * p.chunk, q1 = std::min(nserial, q0 + p.chunk);
    T* dwp = dwpart + t * (p.SK * 6);
    for (int64_t s0 = S0; s0 < S1; s0 += L) {
      const int64_t n = std::min(L, S1 - s0);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t k = p.SK > 1 ? q / p.SB : pk;
        const int64_t b = p.SB > 1 ? q % p.SB : pb;
        const Wts<T> wk(w + 6 * k);
        const scalar_t* r1 = x1 + k * p.st1[0] + b * p.st1[1] + s0 * p.st1[3];
        const scalar_t* r2 = x2 + k * p.st2[0] + b * p.st2[1] + s0 * p.st2[3];
        const scalar_t* rg = grad + k * p.stg[0] + b * p.stg[1] + s0 * p.stg[3];
        if (NORM) {
          for (int64_t s = 0; s < n; ++s) ss[s] = dt[s] = T(0);
          for (int64_t c = 0; c < p.C; ++c) {
            const T* a = load_row(r1 + c * p.st1[2], p.st1[3], n, abuf);
            const T* bb = load_row(r2 + c * p.st2[2], p.st2[3], n, bbuf);
            const T* g = load_row<scalar_t, T, true>(rg + c * p.stg[2], p.stg[3], n, gbuf);
            bwd_stats_row<T, A1, B1>(n, a, bb, g, wk, ss, dt);
          }
          norm_coefs<T>(n, ss, dt, inv, coef);
        }
        T rs[6] = {0, 0, 0, 0, 0, 0};
        for (int64_t c = 0; c < p.C; ++c) {
          const T* a = load_row(r1 + c * p.st1[2], p.st1[3], n, abuf);
          const T* bb = load_row(r2 + c * p.st2[2], p.st2[3], n, bbuf);
          const T* g = load_row<scalar_t, T, true>(rg + c * p.stg[2], p.stg[3], n, gbuf);
          // Row destinations: a DIRECT dx of the kernel's type is written in
          // place; everything else goes through tmp and is stored/added after.
          T* d[2] = {tmp[0], tmp[1]};
          scalar_t* drow[2] = {nullptr, nullptr};
          for (int o = 0; o < 2; ++o) {
            if (dx[o] == nullptr || p.mode[o] != BwdPlan::DIRECT) continue;
            const int64_t* os = p.ost[o];
            drow[o] = dx[o] + k * os[0] + b * os[1] + c * os[2] + s0 * os[3];
            if (same) d[o] = reinterpret_cast<T*>(drow[o]);
          }
          bwd_row<T, A1, B1, NORM>(n, a, bb, g, inv, coef, wk, d[0], d[1], rs);
          for (int o = 0; o < 2; ++o) {
            if (dx[o] == nullptr) continue;
            if (p.mode[o] == BwdPlan::DIRECT) {
              if (!same) store_row(drow[o], tmp[o], n);
              continue;
            }
            const int64_t* os = p.ost[o];
            T* dst = acc[o] + (p.nrep[o] > 1 ? j * p.numel[o] : 0) + k * os[0] + b * os[1] +
                     c * os[2] + s0 * os[3];
            if (p.mode[o] == BwdPlan::ACC_S)
              add_row(dst, tmp[o], n);
            else
              dst[0] += sum_row(tmp[o], n);
          }
        }
        T* dwk = dwp + (p.SK > 1 ? k : 0) * 6;
        for (int i = 0; i < 6; ++i) dwk[i] += rs[i];
      }
    }
  }
}

}  // namespace FM_NS
