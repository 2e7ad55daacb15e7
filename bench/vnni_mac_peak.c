/* The integer multiply-accumulate ceilings of an x86 core with AVX-512 VNNI, register to register (no loads),
   and the forms a 4-bit operand could use instead.

     gcc -O2 -mavx512bw -mavx512vnni bench/vnni_mac_peak.c -o /tmp/vnni_mac_peak && /tmp/vnni_mac_peak

   vpdpbusd zmm:           64 uint8 x int8 products added into 16 int32 lanes, one instruction: what edgeq's
                           x86_vnni512 GEMM issues per step, for int8 and int4 weights alike;
   vpmaddubsw + vpaddw:    the same 64 products summed in int16 lanes (two instructions), the form narrow
                           operands could take to stay exact in int16 for a while;
   vpmaddwd + vpaddd zmm:  32 int16 products (x86_avx512bw);
   vfmadd231ps zmm:        16 fp32 products.
   No instruction of this ISA multiplies operands narrower than a byte: int4 values occupy whole byte lanes.
   Twelve independent accumulators hide the latencies; the CPU time of this thread is what is divided. */
#include <stdio.h>
#include <string.h>
#include <time.h>

static double thread_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void print_cpu(void) {
    char line[8192];
    FILE* f = fopen("/proc/cpuinfo", "r");
    int model = 0, flags = 0;
    if (!f) return;
    while (fgets(line, sizeof line, f) && !(model && flags)) {
        if (!model && strncmp(line, "model name", 10) == 0) { printf("cpu: %s", strchr(line, ':') + 2); model = 1; }
        if (!flags && strncmp(line, "flags", 5) == 0) {
            printf("isa flags:");
            for (char* tok = strtok(strchr(line, ':') + 1, " \n"); tok; tok = strtok(NULL, " \n"))
                if (strstr(tok, "avx") || strstr(tok, "vnni") || strstr(tok, "amx") || strstr(tok, "fma"))
                    printf(" %s", tok);
            printf("\n");
            flags = 1;
        }
    }
    fclose(f);
}

#define DPBUSD(a) "vpdpbusd %%zmm14, %%zmm15, %%zmm" #a "\n\t"
#define UBSW_ADDW(a) "vpmaddubsw %%zmm14, %%zmm15, %%zmm13\n\tvpaddw %%zmm13, %%zmm" #a ", %%zmm" #a "\n\t"
#define MADDWD_ADDD(a) "vpmaddwd %%zmm14, %%zmm15, %%zmm13\n\tvpaddd %%zmm13, %%zmm" #a ", %%zmm" #a "\n\t"
#define FMA(a) "vfmadd231ps %%zmm14, %%zmm15, %%zmm" #a "\n\t"
#define TWELVE(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)

/* thread CPU nanoseconds of `rounds` loops of twelve `op`s */
#define TIME_LOOP(op, rounds) ({                                                          \
    double start_ = thread_seconds();                                                      \
    for (long i_ = 0; i_ < (rounds); i_++) __asm__ volatile(TWELVE(op) ::: "memory");      \
    (thread_seconds() - start_) * 1e9; })

int main(void) {
    const long rounds = 20000000;
    print_cpu();
    double ns[4] = {TIME_LOOP(DPBUSD, rounds), TIME_LOOP(UBSW_ADDW, rounds), TIME_LOOP(MADDWD_ADDD, rounds),
                    TIME_LOOP(FMA, rounds)};
    const char* names[4] = {"int8 vpdpbusd zmm", "int8 vpmaddubsw+vpaddw zmm", "int16 vpmaddwd+vpaddd zmm",
                            "fp32 vfmadd231ps zmm"};
    const int macs[4] = {64, 64, 32, 16};
    for (int i = 0; i < 4; i++) printf("%-28s %6.1f MAC/ns per core\n", names[i], rounds * 12.0 * macs[i] / ns[i]);
    return 0;
}
