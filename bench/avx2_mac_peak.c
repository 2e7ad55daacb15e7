/* The multiply-accumulate ceilings of an AVX2 core without VNNI, register to register (no loads).

     gcc -O2 -mavx2 -mfma bench/avx2_mac_peak.c -o /tmp/avx2_mac_peak && /tmp/avx2_mac_peak

   int8:  an exact int8 x int8 -> int32 MAC on AVX2 is vpmaddwd on int16 lanes (16 MACs) plus a vpaddd into the
          accumulator: what edgeq's x86_avx2 GEMM micro-kernel issues per step;
   fp32:  vfmadd231ps (8 MACs), what a float GEMM (ONNX Runtime's MLAS, edgeq's fp32 kernels) issues.
   Twelve independent accumulators hide the latencies; the CPU time of this thread is what is divided. */
#include <stdio.h>
#include <time.h>

static double thread_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define MADD_ADD(acc) "vpmaddwd %%ymm14, %%ymm15, %%ymm13\n\tvpaddd %%ymm13, %%ymm" #acc ", %%ymm" #acc "\n\t"
#define FMA(acc) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #acc "\n\t"

int main(void) {
    const long rounds = 40000000;
    double start = thread_seconds();
    for (long i = 0; i < rounds; i++)
        __asm__ volatile(MADD_ADD(0) MADD_ADD(1) MADD_ADD(2) MADD_ADD(3) MADD_ADD(4) MADD_ADD(5)
                         MADD_ADD(6) MADD_ADD(7) MADD_ADD(8) MADD_ADD(9) MADD_ADD(10) MADD_ADD(11) ::: "memory");
    double int8_ns = (thread_seconds() - start) * 1e9;
    start = thread_seconds();
    for (long i = 0; i < rounds; i++)
        __asm__ volatile(FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5)
                         FMA(6) FMA(7) FMA(8) FMA(9) FMA(10) FMA(11) ::: "memory");
    double fp32_ns = (thread_seconds() - start) * 1e9;
    double int8_rate = rounds * 12 * 16 / int8_ns, fp32_rate = rounds * 12 * 8 / fp32_ns;
    printf("int8 vpmaddwd+vpaddd: %.1f MAC/ns per core\n", int8_rate);
    printf("fp32 vfmadd231ps:     %.1f MAC/ns per core\n", fp32_rate);
    printf("int8 / fp32:          %.2f\n", int8_rate / fp32_rate);
    return 0;
}
