/* The gather / pool loop, compiled once per instruction set: kernels.c
 * defines ET_ISA(name) and ET_ISA(rowop) before each #include of this file.
 * dtype, mode and gather are compile-time constants at every call site, so
 * each combination becomes its own straight-line loop. */

ET_ALWAYS_INLINE void ET_ISA(loop)(et_call *c, int part, const int dtype, const int mode, const int gather) {
    const et_table *t = c->t;
    const int dim = t->dim;
    const int pf = t->prefetch;
    const int op_rest = mode == ET_POOL_MAX ? ET_OP_MAX : ET_OP_ADD;
    const int fused = c->phase & ET_PHASE_FUSED;
    int64_t p = c->pos_start[part];
    const int64_t end = c->pos_start[part + 1];
    if (fused) {
        for (int64_t q = p; q < end && q < p + 2 * pf; q++) __builtin_prefetch(&t->loc[c->ids[q]], 0, 3);
        for (int64_t q = p; q < end && q < p + pf; q++)
            if (!et_resolve_ahead(c, q, end, pf)) {
                c->err[part] = ET_E_LOCATION;
                c->err_pos[part] = q;
                return;
            }
    }
    for (int64_t b = c->bag_start[part]; b < c->bag_start[part + 1]; b++) {
        float *acc = c->out + b * (int64_t)dim;
        const int64_t len = gather ? 1 : c->lengths[b];
        if (len == 0) {
            memset(acc, 0, (size_t)dim * sizeof(float));
            continue;
        }
        for (int64_t j = 0; j < len; j++, p++) {
            if (fused) {
                if (!et_resolve_ahead(c, p + pf, end, pf)) {
                    c->err[part] = ET_E_LOCATION;
                    c->err_pos[part] = p + pf;
                    return;
                }
            } else if (pf) {
                et_prefetch(c, p, pf);
            }
            const uint8_t *row = c->rows[p];
            const float w = c->weights ? c->weights[p] : 1.0f;
            if (j == 0)
                ET_ISA(rowop)(acc, row, w, dim, dtype, ET_OP_STORE);
            else
                ET_ISA(rowop)(acc, row, w, dim, dtype, op_rest);
        }
        if (!gather && mode == ET_POOL_MEAN) {
            const float inv = 1.0f / (float)len;
            for (int d = 0; d < dim; d++) acc[d] *= inv;
        }
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
