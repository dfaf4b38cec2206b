"""Attention in every common form -> ``fusediff.flash_attention``.

    # sdpa(q, k, v, mask, scale)                             -> flash_attention(q, k, v, mask, scale)
    # softmax(q @ k^T * s [+ m]) @ v          (matmul/bmm)   -> flash_attention(q, k, v, m, s)
    # softmax(baddbmm(m, q, k^T, beta, alpha)) @ v (diffusers AttnProcessor) -> flash_attention(q, k, v, beta*m, alpha)
    # einsum(P, softmax(einsum(Q, q, k) * s)), v)  (LDM CrossAttention, QKVAttention(Legacy), EDM2 cosine)
    #                                                        -> permute . flash_attention . permute

Every score/product pair is read as an einsum: the contracted letter is the head dim ``d``, the
letter only in q is the query position ``i``, the letter only in k the key position ``j``, the
letters in all three are batch (and head) dims. That one reading covers matmul, bmm, baddbmm and
every einsum spelling (``bct,bcs->bts``, ``b i d, b j d -> b i j``, ``nhcq,nhck->nhqk``).
Sites get ``form`` (sdpa/matmul/baddbmm/einsum/qkv_legacy/cosine) and ``kind`` (self/cross).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..canonicalize import canon, forward_chain, is_op, make_call, tensor_meta, through
from ..config import RewriteConfig
from ..sites import Plan, Site


@dataclass
class SdpaPlan(Plan):
    """An SDPA call replaced by the fused op with the same arguments."""

    node: fx.Node


@dataclass
class SoftmaxPlan(Plan):
    """``softmax(A . B * scale + mask) . V`` read as einsums: operands, their letters (``a``, ``b``,
    ``v``; ``r`` the result's), batch letters, query/key/head letters ``i, j, d``, the value's head
    letter ``vd``, the mask with its letters, the scale, and the product node whose users move."""

    A: fx.Node
    B: fx.Node
    V: fx.Node
    a: str
    b: str
    v: str
    r: str
    batch: str
    i: str
    j: str
    d: str
    vd: str
    mask: fx.Node | None
    mask_sub: str | None
    scale: Any
    out: fx.Node

_SHAPE_OPS = ("view", "permute", "transpose", "contiguous", "cast", "getitem", "chunk", "split")


def _num(x):
    return float(x) if isinstance(x, numbers.Number) and not isinstance(x, bool) else None


class _Reject(Exception):
    pass


def _parse_eq(eq: str, n_ops: int) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise _Reject(f"einsum equation {eq!r} uses ellipsis or implicit output")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != n_ops:
        raise _Reject(f"einsum {eq!r}: expected {n_ops} operands")
    return ins, out


def _scores_reading(node: fx.Node):
    """(A_node, B_node, A_sub, B_sub, O_sub, extra_scale, mask, beta, form) for a score node."""
    c = canon(node)
    if c.op == "einsum":
        ops = c.arg("operands")
        if len(ops) != 2:
            raise _Reject("score einsum does not have two operands")
        (a, b), o = _parse_eq(c.arg("equation"), 2)
        return ops[0], ops[1], a, b, o, 1.0, None, "einsum"
    if c.op == "matmul":
        A, B = c.arg("input"), c.arg("other")
        form = "matmul"
        alpha, mask = 1.0, None
    elif c.op == "baddbmm":
        A, B = c.arg("batch1"), c.arg("batch2")
        form = "baddbmm"
        alpha = _num(c.arg("alpha"))
        beta = _num(c.arg("beta"))
        if alpha is None or beta is None:
            raise _Reject("baddbmm alpha/beta are not constants")
        mask = None
        if beta != 0.0:
            if beta != 1.0:
                raise _Reject("baddbmm beta not in {0, 1}")
            mask = c.arg("input")
    else:
        raise _Reject(f"scores come from {c.op}, not matmul/bmm/baddbmm/einsum")
    am, bm = tensor_meta(A), tensor_meta(B)
    if am is None or bm is None or am.dim() != bm.dim() or am.dim() < 2:
        raise _Reject("score operands have different ranks (broadcasting matmul)")
    r = am.dim()
    if tuple(am.shape[:-2]) != tuple(bm.shape[:-2]):
        raise _Reject("score operands have different batch shapes")
    batch = "abcefgh"[: r - 2]
    return A, B, batch + "id", batch + "dj", batch + "ij", alpha, mask, form


def _letters(a: str, b: str, o: str):
    d = set(a) & set(b) - set(o)
    i = set(a) & set(o) - set(b)
    j = set(b) & set(o) - set(a)
    batch = [ch for ch in o if ch in a and ch in b]
    if len(d) != 1 or len(i) != 1 or len(j) != 1 or len(set(a)) != len(a) or len(set(b)) != len(b):
        raise _Reject("scores are not a single-contraction q.k^T")
    if set(a) != set(batch) | i | d or set(b) != set(batch) | j | d or set(o) != set(batch) | i | j:
        raise _Reject("score einsum has extra indices")
    return batch, i.pop(), j.pop(), d.pop()


def _proj_source(n, hops: int = 12):
    """Walk back from q/k through shape ops and scalings to the projection's input (for self/cross)."""
    cur = n
    for _ in range(hops):
        if not isinstance(cur, fx.Node):
            return cur
        c = canon(cur)
        if c is None:
            return cur
        if c.op in ("linear", "conv"):
            return through(c.arg("input"))
        if c.op in _SHAPE_OPS or c.op in ("mul", "div", "normalize"):
            nxt = c.arg("input")
            if not isinstance(nxt, fx.Node) and c.op in ("mul", "div"):
                nxt = c.arg("other")
            cur = nxt
            continue
        return cur
    return cur


def _has_ancestor(n, pred, hops: int = 10) -> bool:
    frontier = [n]
    seen = set()
    for _ in range(hops):
        nxt = []
        for x in frontier:
            if not isinstance(x, fx.Node) or x in seen:
                continue
            seen.add(x)
            if pred(x):
                return True
            if is_op(x, "linear", "conv"):
                continue
            nxt.extend(a for a in x.all_input_nodes)
        frontier = nxt
    return False


def _is_norm_node(x: fx.Node) -> bool:
    if is_op(x, "normalize"):
        return True
    t = str(x.target)
    return "vector_norm" in t or t.endswith(".norm") or "linalg_norm" in t or x.target == "norm"


def _split_source(n, hops: int = 8):
    cur = n
    for _ in range(hops):
        if not isinstance(cur, fx.Node):
            return None
        if is_op(cur, "split", "chunk") or str(cur.target) in ("unbind",) or "unbind" in str(cur.target):
            return cur
        c = canon(cur)
        if c is None or c.op not in _SHAPE_OPS + ("mul", "div"):
            return None
        nxt = c.arg("input")
        if not isinstance(nxt, fx.Node) and c.op in ("mul", "div"):
            nxt = c.arg("other")
        cur = nxt
    return None


def _base_site(anchor: fx.Node, nodes, form, q, k, dtype, shapes) -> Site:
    return Site(pattern="attention", nodes=[n.name for n in nodes], anchor=anchor.name,
                module_path=anchor.meta.get("fusediff_module", ""), shapes=shapes,
                dtype=str(dtype), attrs={"form": form})


def _kind(q, k) -> str:
    qs, ks = _proj_source(q), _proj_source(k)
    return "self" if qs is ks else "cross"


def _finish(site: Site, cfg: RewriteConfig, q4_shape, k4_shape, dtype, why: str | None):
    from ...kernels import attention as katt

    if dtype is not None and dtype != "":
        why = cfg.rejects("attention", dtype, site.module_path) or why
    if why is None:
        ok, r = katt.flash_attention_supported(tuple(q4_shape), tuple(k4_shape), dtype)
        site.attrs["impl"] = "flash"
        if cfg.attention_impl == "partial_softmax":
            site.attrs["impl"] = "partial_softmax"
        elif not ok:
            from ...kernels import softmax as ksm

            if q4_shape[-1] <= ksm.MAX_HEAD_DIM and tuple(q4_shape[:2]) == tuple(k4_shape[:2]):
                # the flash kernel's constraints fail: fall back to the partially fused softmax
                site.attrs["impl"] = "partial_softmax"
                site.reason = f"flash attention not used ({r}); partially fused softmax instead"
            else:
                why = r
    if why is not None:
        site.matched = False
        site.reason = why


def _find_sdpa(node: fx.Node, cfg: RewriteConfig) -> Site:
    c = canon(node)
    q, k, v = c.arg("query"), c.arg("key"), c.arg("value")
    qm, km, vm = tensor_meta(q), tensor_meta(k), tensor_meta(v)
    why = None
    if c.arg("dropout_p") not in (0, 0.0) or c.arg("is_causal") not in (False, None):
        why = "dropout or is_causal set"
    elif qm is None or km is None or vm is None:
        why = "no shape metadata"
    elif qm.dim() not in (3, 4) or km.dim() != qm.dim() or vm.dim() != qm.dim():
        why = f"rank {qm.dim()} inputs (need 3-D or 4-D)"
    elif isinstance(c.arg("scale"), fx.Node):
        why = "scale is a tensor"
    elif vm.shape[-1] != qm.shape[-1]:
        why = "value head dim differs from query head dim"
    shapes = {"q": tuple(qm.shape) if qm is not None else (), "k": tuple(km.shape) if km is not None else ()}
    form = "sdpa"
    if _has_ancestor(q, _is_norm_node, 6) and _has_ancestor(k, _is_norm_node, 6):
        form = "cosine"
    site = _base_site(node, [node], form, q, k, qm.dtype if qm is not None else "", shapes)
    site.attrs["kind"] = _kind(q, k)
    if qm is not None:
        site.attrs["heads"] = int(qm.shape[1]) if qm.dim() == 4 else 1
        site.attrs["head_dim"] = int(qm.shape[-1])
    q4 = tuple(qm.shape) if qm is not None and qm.dim() == 4 else ((qm.shape[0], 1) + tuple(qm.shape[1:]) if qm is not None else ())
    k4 = tuple(km.shape) if km is not None and km.dim() == 4 else ((km.shape[0], 1) + tuple(km.shape[1:]) if km is not None else ())
    _finish(site, cfg, q4, k4, qm.dtype if qm is not None else None, why)
    site.plan = SdpaPlan(node)
    return site


def _find_softmax(sm: fx.Node, cfg: RewriteConfig) -> Site | None:
    c = canon(sm)
    s_in = c.arg("input")
    smm = tensor_meta(sm)
    # -- output product: softmax -> [cast] -> matmul/einsum(p, v)
    post = forward_chain(sm)
    p_out = post[-1] if post else sm
    users = list(p_out.users)
    if len(users) != 1 or not is_op(users[0], "matmul", "einsum"):
        return None  # a softmax that is not attention (e.g. a classifier head)
    pv = users[0]
    region = [sm] + post + [pv]
    # -- scores: [cast] <- [add mask] <- [mul/div scale] <- scores
    cur = through(s_in)
    scale, mask = 1.0, None
    pre_nodes = []
    try:
        if is_op(cur, "add"):
            ac = canon(cur)
            a, b = ac.arg("input"), ac.arg("other")
            # the operand that leads to a matmul/einsum is the score; the other is the mask
            def leads(x):
                x = through(x)
                while is_op(x, "mul", "div"):
                    x = through(canon(x).arg("input"))
                return is_op(x, "matmul", "einsum", "baddbmm")
            if leads(a) and isinstance(b, fx.Node):
                mask = b
                pre_nodes.append(cur)
                cur = through(a)
            elif leads(b) and isinstance(a, fx.Node):
                mask = a
                pre_nodes.append(cur)
                cur = through(b)
            else:
                raise _Reject("softmax input is an add that is not scores + mask")
        while is_op(cur, "mul", "div"):
            mc = canon(cur)
            a, b = mc.arg("input"), mc.arg("other")
            if _num(b) is not None and isinstance(a, fx.Node):
                f, nxt = _num(b), a
            elif _num(a) is not None and isinstance(b, fx.Node) and mc.op == "mul":
                f, nxt = _num(a), b
            else:
                raise _Reject("scores scaled by a tensor, not a constant")
            if mask is not None:
                pass  # scale applies before the mask add: fine
            scale = scale * f if mc.op == "mul" else scale / f
            pre_nodes.append(cur)
            cur = through(nxt)
        if not is_op(cur, "matmul", "einsum", "baddbmm"):
            raise _Reject(f"softmax input does not come from a q.k^T product ({canon(cur).op if canon(cur) else cur})")
        A, B, a_sub, b_sub, o_sub, alpha, bmask, form = _scores_reading(cur)
        if bmask is not None:
            if mask is not None or scale != 1.0:
                raise _Reject("baddbmm mask combined with further scaling/masking")
            mask = bmask
        scale *= alpha
        batch, i, j, d = _letters(a_sub, b_sub, o_sub)
        dim = c.arg("dim")
        if dim is None or smm is None:
            raise _Reject("softmax dim unknown")
        dim = dim % smm.dim()
        if o_sub[dim] != j:
            raise _Reject("softmax is not over the key dimension")
        if len(batch) > 2:
            raise _Reject("more than two batch dims")
        # output product as einsum over the score letters
        pc = canon(pv)
        if pc.op == "matmul":
            if pc.arg("input") is not p_out:
                raise _Reject("probabilities are the right operand of the product")
            V = pc.arg("other")
            vm_ = tensor_meta(V)
            if vm_ is None or vm_.dim() != len(o_sub):
                raise _Reject("value rank differs from score rank")
            p_sub, v_sub, r_sub = o_sub, "".join(batch) + j + "v", "".join(batch) + i + "v"
            if [ch for ch in o_sub if ch in batch] != list(batch) or o_sub.index(i) > o_sub.index(j):
                raise _Reject("matmul score layout unexpected")
        else:
            ops = pc.arg("operands")
            if len(ops) != 2 or ops[0] is not p_out:
                raise _Reject("output einsum does not take the probabilities first")
            V = ops[1]
            (p_raw, v_raw), r_raw = _parse_eq(pc.arg("equation"), 2)
            if len(p_raw) != len(o_sub):
                raise _Reject("probability einsum rank mismatch")
            ren = {p_raw[t]: o_sub[t] for t in range(len(p_raw))}
            fresh = [ch for ch in "vwxyzuts" if ch not in ren.values()]
            for ch in v_raw + r_raw:
                if ch not in ren:
                    ren[ch] = fresh.pop(0)
            p_sub = o_sub
            v_sub = "".join(ren[ch] for ch in v_raw)
            r_sub = "".join(ren[ch] for ch in r_raw)
            extra = set(v_sub) - set(batch) - {j}
            if len(extra) != 1 or set(r_sub) != set(batch) | {i} | extra:
                raise _Reject("output einsum is not probabilities @ values")
        vdim = (set(v_sub) - set(batch) - {j}).pop()
        am, bm, vm = tensor_meta(A), tensor_meta(B), tensor_meta(V)
        D = am.shape[a_sub.index(d)]
        Dv = vm.shape[v_sub.index(vdim)]
        Lq = am.shape[a_sub.index(i)]
        Lk = bm.shape[b_sub.index(j)]
        if D != Dv:
            raise _Reject(f"value head dim {Dv} != query head dim {D}")
        bshape = [am.shape[a_sub.index(ch)] for ch in batch]
        mask_sub = None
        if mask is not None:
            mm = tensor_meta(mask)
            if mm is None or mm.dim() != len(o_sub):
                raise _Reject("mask rank differs from score rank")
            mask_sub = o_sub
        why = None
    except _Reject as e:
        why = str(e)
    qsrc = locals().get("A")
    ksrc = locals().get("B")
    region = pre_nodes[::-1] + region
    shapes = {}
    if why is None:
        shapes = {"q": tuple(bshape) + (Lq, D), "k": tuple(bshape) + (Lk, D)}
    anchor_dtype = tensor_meta(qsrc).dtype if isinstance(qsrc, fx.Node) and tensor_meta(qsrc) is not None else (smm.dtype if smm is not None else "")
    form_name = locals().get("form", "matmul")
    if why is None:
        if _has_ancestor(qsrc, _is_norm_node, 6) and _has_ancestor(ksrc, _is_norm_node, 6):
            form_name = "cosine"
        elif _split_source(qsrc) is not None and _split_source(qsrc) is _split_source(ksrc):
            form_name = "qkv_legacy"
    site = _base_site(sm, region, form_name, qsrc, ksrc, anchor_dtype, shapes)
    if why is None:
        site.attrs["kind"] = _kind(qsrc, ksrc)
        site.attrs["heads"] = int(bshape[-1]) if len(bshape) == 2 else 1
        site.attrs["head_dim"] = int(D)
        q4 = (([1] * (2 - len(bshape))) + list(bshape)) + [Lq, D]
        k4 = (([1] * (2 - len(bshape))) + list(bshape)) + [Lk, D]
        # the kernel computes in q's dtype: q, k, v must share it
        dts = {tensor_meta(x).dtype for x in (A, B, V)}
        if len(dts) != 1:
            why = f"q/k/v dtypes differ {sorted(map(str, dts))}"
        _finish(site, cfg, q4, k4, anchor_dtype, why)
        site.plan = SoftmaxPlan(A, B, V, a_sub, b_sub, v_sub, r_sub, "".join(batch), i, j, d, vdim, mask, mask_sub,
                                scale, pv)
    else:
        site.attrs["kind"] = "?"
        site.matched = False
        site.reason = why
    return site


def find(gm: fx.GraphModule, cfg: RewriteConfig) -> list[Site]:
    sites: list[Site] = []
    for n in gm.graph.nodes:
        if is_op(n, "sdpa"):
            sites.append(_find_sdpa(n, cfg))
        elif is_op(n, "softmax"):
            s = _find_softmax(n, cfg)
            if s is not None:
                sites.append(s)
    return sites


def _to_bhld(g, x, sub: str, batch: str, l: str, d: str, like):
    """einsum permute ``x`` (letters ``sub``) to (B, H, L, D) with batch dims padded to two."""
    y = make_call(g, torch.einsum, (f"{sub}->{batch}{l}{d}", x), like=like)
    for _ in range(2 - len(batch)):
        y = make_call(g, torch.unsqueeze, (y, 0), like=like)
    return y


def _partial_softmax(q, k, v, attn_mask, scale):
    from ...kernels.softmax import partial_softmax_attention

    return partial_softmax_attention(q, k, v, scale=scale, attn_mask=attn_mask)


def rewrite(gm: fx.GraphModule, site: Site) -> None:
    from ...kernels import attention  # noqa: F401  (registers fusediff::flash_attention)
    from ...kernels import softmax  # noqa: F401  (registers fusediff::softmax_stats / softmax_matmul)

    p = site.plan
    g = gm.graph
    # same argument order for both: (q, k, v, mask, scale)
    fa = torch.ops.fusediff.flash_attention.default if site.attrs.get("impl", "flash") == "flash" \
        else _partial_softmax
    if isinstance(p, SdpaPlan):
        node = p.node
        c = canon(node)
        q, k, v = c.arg("query"), c.arg("key"), c.arg("value")
        mask, scale = c.arg("attn_mask"), c.arg("scale")
        three_d = tensor_meta(q).dim() == 3
        with g.inserting_before(node):
            if three_d:
                q, k, v = (make_call(g, torch.unsqueeze, (t, 1), like=node) for t in (q, k, v))
                if isinstance(mask, fx.Node) and tensor_meta(mask).dim() == 3:
                    mask = make_call(g, torch.unsqueeze, (mask, 1), like=node)
            # sdpa(q, k, v, mask, scale) -> flash_attention(q, k, v, mask, scale)
            out = make_call(g, fa, (q, k, v, mask, scale), like=node, val_=node.meta.get("val"))
            if three_d:
                out = make_call(g, torch.squeeze, (out, 1), like=node, val_=node.meta.get("val"))
        node.replace_all_uses_with(out)
        site.rewritten = True
        return
    assert isinstance(p, SoftmaxPlan), site
    out_node = p.out
    b, i, j, d, vd = p.batch, p.i, p.j, p.d, p.vd
    with g.inserting_before(out_node):
        q4 = _to_bhld(g, p.A, p.a, b, i, d, out_node)
        k4 = _to_bhld(g, p.B, p.b, b, j, d, out_node)
        v4 = _to_bhld(g, p.V, p.v, b, j, vd, out_node)
        m4 = None
        if p.mask is not None:
            m4 = _to_bhld(g, p.mask, p.mask_sub, b, i, j, out_node)
        # softmax(q.k^T * s + m) @ v -> flash_attention(q, k, v, m, s)
        o4 = make_call(g, fa, (q4, k4, v4, m4, float(p.scale)), like=out_node)
        # what the unfused form moved through DRAM and the kernel keeps on chip: the score matrix
        # written by q.k^T and read by softmax, the probabilities written by softmax and read by p.v
        q_shape, k_shape = site.shapes["q"], site.shapes["k"]
        n_scores = 1
        for d_ in tuple(q_shape[:-1]) + (k_shape[-2],):
            n_scores *= int(d_)
        item = tensor_meta(out_node).element_size() if tensor_meta(out_node) is not None else 4
        o4.meta["fusediff_fused_away"] = (2 * n_scores * item, 2 * n_scores * item)
        o = o4
        for _ in range(2 - len(b)):
            o = make_call(g, torch.squeeze, (o, 0), like=out_node)
        o = make_call(g, torch.einsum, (f"{b}{i}{vd}->{p.r}", o), like=out_node)
        want = tensor_meta(out_node)
        if want is not None:
            o = make_call(g, torch.Tensor.to, (o, want.dtype), like=out_node)
            o = make_call(g, torch.Tensor.contiguous, (o,), like=out_node, val_=out_node.meta.get("val"))
    out_node.replace_all_uses_with(o)
    site.rewritten = True
