// Runs a Monarch forward kernel that takes a MonarchFwdArgs on the CPU through sim.h: the row-split few-token
// kernel (csrc/cuda/decode_rowsplit.cuh), the resident many-token kernel (csrc/cuda/resident.cuh) or its
// cluster form for square Monarch (csrc/cuda/cluster_resident.cuh).
//
//   fwd_sim KERNEL DTYPE TOKENS K Q P L S R N_IN N_OUT X_TS X_FS ACT HAS_BIAS SMS SMEM_OPTIN MISALIGN KEEP_Z DIR
//
// KERNEL rowsplit, resident or cluster (prefixed "plan:", only the plan is printed: nothing runs or is written);
// DTYPE 0 fp32, 1 fp16, 2 bf16. Reads DIR/x.bin (X_TS * (TOKENS - 1) + X_FS *
// (N_IN - 1) + 1 elements), DIR/w1.bin, DIR/w2.bin and, with HAS_BIAS, DIR/bias.bin, raw little-endian
// elements. Each operand lives in its own exactly sized heap buffer (an address sanitizer then catches any read
// past it), shifted by one element when MISALIGN is 1 (no 16-byte vector loads). Prints the plan as one JSON
// line (or {"supported": false}) and writes DIR/out.bin (TOKENS x N_OUT, poisoned with NaN before the launch);
// with KEEP_Z 1 the kernel also keeps the intermediate, written to DIR/z.bin (TOKENS x K·Q, poisoned too).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "decode_rowsplit.cuh"
#include "cluster_resident.cuh"
#include "resident.cuh"

namespace {

struct Buffer {  // `bytes` of data at an offset of `shift` bytes into an exactly sized allocation
  std::vector<unsigned char> storage;
  unsigned char* data;
  Buffer(size_t bytes, size_t shift) : storage(bytes + shift), data(storage.data() + shift) {}
};

Buffer read_file(const std::string& path, size_t bytes, size_t shift) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (raw.size() != bytes) {
    std::fprintf(stderr, "%s: %zu bytes, expected %zu\n", path.c_str(), raw.size(), bytes);
    std::exit(2);
  }
  Buffer b(bytes, shift);
  std::copy(raw.begin(), raw.end(), b.data);
  return b;
}

template <typename T>
void run_rowsplit(const monarch_cuda::RowsplitPlan& P) {
  const int TB = P.tokens <= 1 ? 1 : P.tokens <= 4 ? 4 : 16;
  const dim3 grid(P.l, P.splits);
  if (TB == 1) sim::launch(grid, monarch_cuda::kRowsplitThreads, P.smem, monarch_cuda::rowsplit_kernel<T, 1>, P);
  if (TB == 4) sim::launch(grid, monarch_cuda::kRowsplitThreads, P.smem, monarch_cuda::rowsplit_kernel<T, 4>, P);
  if (TB == 16) sim::launch(grid, monarch_cuda::kRowsplitThreads, P.smem, monarch_cuda::rowsplit_kernel<T, 16>, P);
}

template <typename T>
void run_resident(const monarch_cuda::ResidentPlan& P) {
  sim::launch(dim3(P.ctas), monarch_cuda::kResidentThreads, P.smem, monarch_cuda::resident_kernel<T>, P);
}

template <typename T>
void run_cluster(const monarch_cuda::ClusterPlan& P) {
  const unsigned grid = static_cast<unsigned>(P.clusters * P.cluster), size = static_cast<unsigned>(P.cluster);
  const int threads = monarch_cuda::kClusterThreads;
  if (P.nb == 16) sim::launch_cluster(grid, size, threads, P.smem, monarch_cuda::cluster_kernel<T, 16>, P);
  if (P.nb == 32) sim::launch_cluster(grid, size, threads, P.smem, monarch_cuda::cluster_kernel<T, 32>, P);
  if (P.nb == 64) sim::launch_cluster(grid, size, threads, P.smem, monarch_cuda::cluster_kernel<T, 64>, P);
}

bool plan_and_run(const std::string& kernel, int dtype, const monarch_cuda::MonarchFwdArgs& a, int item, int sms,
                  int smem_optin, bool run) {
  if (kernel == "rowsplit") {
    monarch_cuda::RowsplitPlan P;
    if (!monarch_cuda::rowsplit_plan(a, item, sms, smem_optin, P)) return false;
    std::printf("{\"supported\": true, \"splits\": %d, \"s_per\": %d, \"a_log2\": %d, \"b_log2\": %d, "
                "\"zpitch\": %d, \"smem\": %d, \"w1_vec\": %d, \"w2_vec\": %d, \"x_vec\": %d, \"s1_vec\": %d}\n",
                P.splits, P.s_per, P.a_log2, P.b_log2, P.zpitch, P.smem, P.w1_vec, P.w2_vec, P.x_vec, P.s1_vec);
    if (!run) return true;
    if (dtype == 0) run_rowsplit<float>(P);
    if (dtype == 1) run_rowsplit<__half>(P);
    if (dtype == 2) run_rowsplit<__nv_bfloat16>(P);
    return true;
  }
  if (kernel == "cluster") {
    monarch_cuda::ClusterPlan P;
    if (!monarch_cuda::cluster_plan(a, item, sms, smem_optin, P)) return false;
    std::printf("{\"supported\": true, \"cluster\": %d, \"pitch\": %d, \"tiles\": %d, \"clusters\": %d, "
                "\"smem\": %d}\n", P.cluster, P.pitch, P.tiles, P.clusters, P.smem);
    if (!run) return true;
    if (dtype == 1) run_cluster<__half>(P);
    if (dtype == 2) run_cluster<__nv_bfloat16>(P);
    return true;
  }
  monarch_cuda::ResidentPlan P;
  if (kernel != "resident" || !monarch_cuda::resident_plan(a, item, sms, smem_optin, P)) return false;
  std::printf("{\"supported\": true, \"pitch\": %d, \"units1\": %d, \"units2\": %d, \"tiles\": %d, "
              "\"ctas\": %d, \"smem\": %d}\n", P.pitch, P.units1, P.units2, P.tiles, P.ctas, P.smem);
  if (!run) return true;
  if (dtype == 1) run_resident<__half>(P);
  if (dtype == 2) run_resident<__nv_bfloat16>(P);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 21) {
    std::fprintf(stderr, "usage: see the header of fwd_main.cpp\n");
    return 2;
  }
  const std::string arg = argv[1], plan_prefix = "plan:";
  const bool run = arg.compare(0, plan_prefix.size(), plan_prefix) != 0;
  const std::string kernel = run ? arg : arg.substr(plan_prefix.size());
  long long v[18];
  for (int i = 0; i < 18; ++i) v[i] = std::atoll(argv[i + 2]);
  const std::string dir = argv[20];
  const int dtype = static_cast<int>(v[0]);
  const size_t item = dtype == 0 ? 4 : 2, shift = v[16] ? item : 0;
  monarch_cuda::MonarchFwdArgs a{};
  a.tokens = v[1], a.k = v[2], a.q = v[3], a.p = v[4], a.l = v[5], a.s = v[6], a.r = v[7];
  a.n_in = v[8], a.n_out = v[9], a.x_ts = v[10], a.x_fs = v[11], a.act = static_cast<int>(v[12]);
  const bool has_bias = v[13] != 0;
  const size_t x_elems = static_cast<size_t>(a.x_ts * (a.tokens - 1) + a.x_fs * (a.n_in - 1) + 1);
  Buffer x = read_file(dir + "/x.bin", x_elems * item, shift);
  Buffer w1 = read_file(dir + "/w1.bin", a.k * a.q * a.p * item, shift);
  Buffer w2 = read_file(dir + "/w2.bin", a.l * a.s * a.r * item, shift);
  Buffer bias = has_bias ? read_file(dir + "/bias.bin", a.n_out * item, shift) : Buffer(0, 0);
  Buffer out(a.tokens * a.n_out * item, shift);
  std::fill(out.data, out.data + a.tokens * a.n_out * item, 0xff);  // NaN in every dtype
  a.x = x.data, a.w1 = w1.data, a.w2 = w2.data, a.bias = has_bias ? bias.data : nullptr, a.out = out.data;
  a.out_ts = a.n_out;
  const bool keep_z = v[17] != 0;
  const size_t z_bytes = keep_z ? static_cast<size_t>(a.tokens * a.k * a.q) * item : 0;
  Buffer z(z_bytes, shift);
  std::fill(z.data, z.data + z_bytes, 0xff);
  if (keep_z) a.z = z.data, a.z_ts = a.k * a.q;
  if (!plan_and_run(kernel, dtype, a, static_cast<int>(item), static_cast<int>(v[14]), static_cast<int>(v[15]),
                    run)) {
    std::printf("{\"supported\": false}\n");
    return 0;
  }
  if (!run) return 0;
  std::ofstream(dir + "/out.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(out.data), static_cast<std::streamsize>(a.tokens * a.n_out * item));
  if (keep_z)
    std::ofstream(dir + "/z.bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(z.data), static_cast<std::streamsize>(z_bytes));
  return 0;
}
