/* The gather / pool loop, compiled once per instruction set.  kernels.c
 * defines, before each #include of this file:
 *   ET_ISA(name)  the name suffixed with the instruction set
 *   ET_VEC, ET_W  the vector type and the floats it holds (1 for plain C)
 *   ET_MAXV       how many accumulators stay in registers (8: the block switch below)
 *   ET_ISA(vset), vadd, vmax, vstore, vload (w * row[j .. j + ET_W)), sload (w * row[j])
 * Each bag is pooled in blocks of up to ET_MAXV vectors held in registers,
 * so a row costs one load and one add per vector; dtype, mode and the block
 * width are compile-time constants at every call, so each combination
 * becomes its own straight-line loop. */

/* Pools positions [p, p + len) into out[d0, d0 + nv * ET_W).  The first
 * block of a bag also resolves and prefetches the rows pf positions ahead. */
ET_ALWAYS_INLINE int ET_ISA(block)(et_call *c, int part, int64_t p, int64_t len, int64_t end, float *out, int d0,
                                  const int nv, const int dtype, const int op, int ahead) {
    const et_ahead a = et_ahead_of(c, part);
    const float *const weights = c->weights;  /* locals: stores to rows[] cannot make them stale */
    const int dim = c->t->dim;
    ET_VEC acc[ET_MAXV];
    const ET_VEC init = ET_ISA(vset)(op == ET_OP_MAX ? -INFINITY : 0.0f);
    for (int k = 0; k < nv; k++) acc[k] = init;
    for (int64_t j = p; j < p + len; j++) {
        if (ahead) {
            const int64_t bad = et_ahead_at(&a, j, end);
            if (bad >= 0) return (int)(bad - p) + 1;
        }
        const uint8_t *row = a.rows[j];
        const float w = weights ? weights[j] : 1.0f;
        float ws = 0, wb = 0;
        if (dtype == ET_DTYPE_I8) et_i8_params(row, dim, w, &ws, &wb);
        const ET_VEC vw = ET_ISA(vset)(w), vs = ET_ISA(vset)(ws), vb = ET_ISA(vset)(wb);
        for (int k = 0; k < nv; k++) {
            ET_VEC x = ET_ISA(vload)(row, d0 + k * ET_W, dtype, vw, vs, vb);
            acc[k] = op == ET_OP_MAX ? ET_ISA(vmax)(acc[k], x) : ET_ISA(vadd)(acc[k], x);
        }
    }
    for (int k = 0; k < nv; k++) ET_ISA(vstore)(out + d0 + k * ET_W, acc[k]);
    return 0;
}

/* Elements [d0, dim) that do not fill a vector, one float at a time. */
ET_ALWAYS_INLINE void ET_ISA(tail)(const et_call *c, int64_t p, int64_t len, float *out, int d0, const int dtype,
                                  const int op) {
    const int dim = c->t->dim;
    for (int d = d0; d < dim; d++) out[d] = op == ET_OP_MAX ? -INFINITY : 0.0f;
    for (int64_t j = p; j < p + len; j++) {
        const uint8_t *row = c->rows[j];
        const float w = c->weights ? c->weights[j] : 1.0f;
        float ws = 0, wb = 0;
        if (dtype == ET_DTYPE_I8) et_i8_params(row, dim, w, &ws, &wb);
        for (int d = d0; d < dim; d++) {
            float x = ET_ISA(sload)(row, d, dtype, w, ws, wb);
            out[d] = op == ET_OP_MAX ? fmaxf(out[d], x) : out[d] + x;
        }
    }
}

/* One bag; returns 0, or 1 + the offset from p of a position with no storage. */
ET_ALWAYS_INLINE int ET_ISA(bag)(et_call *c, int part, int64_t p, int64_t len, int64_t end, float *out, const int dtype,
                                const int op) {
    const int dim = c->t->dim;
    int d0 = 0, ahead = 1, bad = 0;
    for (int left = dim / ET_W; left > 0 && !bad; ahead = 0) {
        const int nv = left < ET_MAXV ? left : ET_MAXV;
        switch (nv) {
#define ET_BLOCK(N)                                                                      \
    case N:                                                                              \
        bad = ET_ISA(block)(c, part, p, len, end, out, d0, N, dtype, op, ahead);                    \
        break;
            ET_BLOCK(1) ET_BLOCK(2) ET_BLOCK(3) ET_BLOCK(4) ET_BLOCK(5) ET_BLOCK(6) ET_BLOCK(7)
            default: bad = ET_ISA(block)(c, part, p, len, end, out, d0, ET_MAXV, dtype, op, ahead); break;
#undef ET_BLOCK
        }
        d0 += nv * ET_W;
        left -= nv;
    }
    if (bad) return bad;
    if (ahead) { /* dim < ET_W: the tail is the only pass, so it gets the rows ahead itself */
        const et_ahead a = et_ahead_of(c, part);
        for (int64_t j = p; j < p + len; j++) {
            const int64_t bad = et_ahead_at(&a, j, end);
            if (bad >= 0) return (int)(bad - p) + 1;
        }
    }
    if (d0 < dim) ET_ISA(tail)(c, p, len, out, d0, dtype, op);
    return 0;
}

ET_ALWAYS_INLINE void ET_ISA(loop)(et_call *c, int part, const int dtype, const int mode, const int gather) {
    const et_table *t = c->t;
    const int dim = t->dim;
    const int pf = t->prefetch;
    const int op = mode == ET_POOL_MAX ? ET_OP_MAX : ET_OP_ADD;
    int64_t p = c->pos_start[part];
    const int64_t end = c->pos_start[part + 1];
    if (c->phase & ET_PHASE_FUSED) {
        const et_ahead a = et_ahead_of(c, part);
        if (!c->direct)
            for (int64_t q = p; q < end && q < p + 3 * pf; q++) __builtin_prefetch(&t->loc[c->ids[q]], 0, 3);
        for (int64_t q = p; q < end && q < p + 2 * pf; q++)
            if (!et_resolve_one(&a, q)) {
                c->err[part] = ET_E_LOCATION;
                c->err_pos[part] = q;
                return;
            }
    }
    for (int64_t b = c->bag_start[part]; b < c->bag_start[part + 1]; b++) {
        float *out = c->out + b * (int64_t)dim;
        const int64_t len = gather ? 1 : c->lengths[b];
        if (len == 0) {
            memset(out, 0, (size_t)dim * sizeof(float));
            continue;
        }
        int bad = ET_ISA(bag)(c, part, p, len, end, out, dtype, op);
        if (bad) {
            c->err[part] = ET_E_LOCATION;
            c->err_pos[part] = p + bad - 1;
            return;
        }
        if (!gather && mode == ET_POOL_MEAN) {
            const float inv = 1.0f / (float)len;
            for (int d = 0; d < dim; d++) out[d] *= inv;
        }
        p += len;
    }
}

static void ET_ISA(part)(et_call *c, int part) {
#define ET_CASE(DT)                                                    \
    case DT:                                                           \
        if (c->gather)                                                 \
            ET_ISA(loop)(c, part, DT, ET_POOL_SUM, 1);                 \
        else if (c->mode == ET_POOL_SUM)                               \
            ET_ISA(loop)(c, part, DT, ET_POOL_SUM, 0);                 \
        else if (c->mode == ET_POOL_MEAN)                              \
            ET_ISA(loop)(c, part, DT, ET_POOL_MEAN, 0);                \
        else                                                           \
            ET_ISA(loop)(c, part, DT, ET_POOL_MAX, 0);                 \
        break;
    switch (c->t->dtype) {
        ET_CASE(ET_DTYPE_F32)
        ET_CASE(ET_DTYPE_F16)
        ET_CASE(ET_DTYPE_I8)
    }
#undef ET_CASE
}
