// Package placement is the topology-aware device placement behind the
// device plugin's GetPreferredAllocation: among the available GPUs of a
// node, it chooses size GPUs that include the must-include ones and are as
// well connected as possible. It is pure computation: no gRPC, no NVML.
//
// # Objective
//
// Every pair of distinct GPUs i, j has an integer weight
//
//	w(i,j) = NVLinks·2^24 + PCIe·2^11 + sameNUMA
//
// with PCIe the proximity SYS=0 < NODE=1 < PHB=2 < PXB=3 < PIX=4 (as in
// `nvidia-smi topo -m`; unknown counts as SYS) and sameNUMA 0 or 1. The
// score of a set S is the sum of w over its unordered pairs. Comparing
// scores is comparing, lexicographically, (1) the total NVLink count, (2)
// the total PCIe proximity, (3) the number of same-NUMA pairs: a set has at
// most C(64,2) = 2016 pairs, whose NUMA terms sum to at most 2016 < 2^11,
// and whose PCIe and NUMA terms sum to at most 2016·(4·2^11+1) =
// 16,517,088 < 2^24. So one more NVLink beats any PCIe/NUMA difference, and
// one PCIe step beats any NUMA difference. (The usual bound C(32,2) = 496
// pairs would allow smaller constants; 64-GPU requests need 2016.)
//
// Among sets of equal score, Select prefers the one that leaves the
// remaining free GPUs R = A \ S (A: available) best connected: the highest
// inside(R), the total pair weight within R. As
// inside(R) = inside(A) − Σ_{s∈S} deg_A(s) + inside(S), with
// deg_A(s) = Σ_{a∈A} w(s,a), for equal scores this means the lowest
// Σ deg_A(s). Remaining ties go to the lexicographically smallest sorted
// index list. The answer is a function of the sets given, not their order.
//
// # Exactness and speed
//
// Select returns the exact optimum of that full order whenever at most
// ExactLimit (16) GPUs are candidates (available and not must-include),
// however long it takes. With more it runs the same search under a work
// budget (about half a millisecond), keeping the best set found: exact
// whenever the search finishes, else at least as good as the heuristic
// below. Exactness is guaranteed only up to 16 GPUs.
//
// The search is a depth-first branch and bound that builds sets in
// increasing index order (each level adds the next member), with sets as
// uint64 bit masks, the weight matrix and each GPU's neighbours by
// decreasing weight precomputed by NewTopology, and per-candidate gains
// updated in place in fixed arrays, so that a call allocates only its
// result. The bound adds to the current score, for the best k remaining
// candidates, their weight to the chosen set plus half their k-1 heaviest
// edges into the remaining candidates; on primary ties it bounds Σ deg_A
// and the index order. Small exact problems (≤ 2000 candidate sets) are
// enumerated without bounds; the last pick is always a direct scan. For
// larger ones the incumbent comes first from a heuristic: the
// densest-subgraph peel (drop the least-connected GPU until size remain)
// and a greedy completion seeded from every candidate, each improved by
// best-improvement 1-swap local search.
//
// Per-call latency over 2000 random requests (BenchmarkSelectLatency, on a
// shared 2-core AMD EPYC VM): an 8-GPU DGX-1 p50 0.25 µs, p99 1.5 µs;
// 16 GPUs (two DGX-1 boards) p50 1 µs, p99 45 µs, max 70 µs; 32 GPUs
// (four boards) p50 35 µs, p99 0.6 ms. A call normally allocates only its
// result (the bounds borrow a pooled 4 KiB table).
//
// # Shared devices
//
// SelectShared chooses time-slicing replicas or MIG devices (Unit) under a
// Policy: Distributed balances load across physical GPUs, Packed fills busy
// GPUs and keeps a request on as few GPUs as possible; the topology breaks
// the policy's ties. Its doc comment states the exact rule.
package placement
