"""PyTorch twin of `cargo bench -p knobs-nn --bench ops`: the same shapes, fp32, median of N.
    python scripts/ops_peer.py [--threads 2] [--iters 5]"""
import argparse, os, statistics, time
import torch
import torch.nn.functional as F
p = argparse.ArgumentParser(); p.add_argument("--threads", type=int, default=2); p.add_argument("--iters", type=int, default=5)
a = p.parse_args(); torch.set_num_threads(a.threads); torch.manual_seed(0)
def med(f):
    f(); t = []
    for _ in range(a.iters):
        s = time.perf_counter(); f(); t.append((time.perf_counter() - s) * 1e3)
    return statistics.median(t)
print("threads", torch.get_num_threads())
def shapes_from_env(var, default):
    """Shapes from `var` ("a,b,...;a,b,...", as for the Rust bench), or `default` when unset."""
    return [tuple(int(v) for v in t.split(",")) for t in os.environ[var].split(";")] if os.environ.get(var) else default
# KNOBS_BENCH_CONV="b,ci,co,hw;...", KNOBS_BENCH_MATMUL="rows,k,n;...", KNOBS_BENCH_ATTN="tokens,width,heads;...".
for b, ci, co, hw in shapes_from_env("KNOBS_BENCH_CONV", [(2, 320, 320, 64), (2, 640, 640, 32), (1, 320, 320, 64)]):
    x = torch.randn(b, ci, hw, hw); w = torch.randn(co, ci, 3, 3) * 0.05
    with torch.no_grad():
        fwd = med(lambda: F.conv2d(x, w, padding=1))
    xa = x.clone().requires_grad_(); wa = w.clone().requires_grad_()
    both = med(lambda: F.conv2d(xa, wa, padding=1).sum().backward())
    input_only = med(lambda: F.conv2d(xa, w, padding=1).sum().backward())
    print(f"conv3x3 [{b},{ci},{hw},{hw}]->{co}: forward {fwd:.1f} ms, fwd+bwd(x) {input_only:.1f} ms, fwd+bwd(x,w) {both:.1f} ms")
for rows, k, n in shapes_from_env("KNOBS_BENCH_MATMUL", [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320)]):
    A = torch.randn(rows, k); B = torch.randn(k, n) * 0.05
    ms = med(lambda: A @ B)
    print(f"matmul [{rows},{k}]x[{k},{n}]: {ms:.1f} ms ({2*rows*k*n/ms/1e6:.0f} GFLOP/s)")
    W = torch.randn(n, k) * 0.05; bias = torch.randn(n) * 0.05
    ms = med(lambda: F.linear(A, W, bias))
    print(f"linear [{rows},{k}] -> {n} with bias: {ms:.1f} ms")
for n, width, heads in shapes_from_env("KNOBS_BENCH_ATTN", [(4096, 320, 8), (4096, 512, 1)]):
    q, k, v = (torch.randn(1, heads, n, width // heads) for _ in range(3))
    with torch.no_grad():
        fwd = med(lambda: F.scaled_dot_product_attention(q, k, v))
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    both = med(lambda: F.scaled_dot_product_attention(qa, ka, va).sum().backward())
    print(f"attention [1,{n},{width}] {heads} heads: forward {fwd:.1f} ms, fwd+bwd {both:.1f} ms")
y = torch.randn(4096, 2560).requires_grad_()
def geglu():
    h, g = y.chunk(2, dim=-1)
    (h * F.gelu(g)).sum().backward()
print(f"geglu [4096,2560] fwd+bwd(x): {med(geglu):.1f} ms")
for b, c, hw in [(2, 320, 64), (8, 32, 32)]:
    x = torch.randn(b, c, hw, hw).requires_grad_(); norm = torch.nn.GroupNorm(32, c, eps=1e-5)
    for q in norm.parameters(): q.requires_grad_(False)
    ms = med(lambda: F.silu(norm(x)).sum().backward())
    print(f"groupnorm+silu [{b},{c},{hw},{hw}] fwd+bwd(x): {ms:.1f} ms")
for rows, c in [(4096, 320), (1024, 640)]:
    x = torch.randn(1, rows, c).requires_grad_(); norm = torch.nn.LayerNorm(c, eps=1e-5)
    for q in norm.parameters(): q.requires_grad_(False)
    ms = med(lambda: norm(x).sum().backward())
    print(f"layernorm [1,{rows},{c}] fwd+bwd(x): {ms:.1f} ms")
