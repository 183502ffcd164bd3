/*
 * cpuburn N -- a deterministic CPU workload that prints its result.
 *
 * Mixes integer (splitmix64) and SSE double-precision arithmetic, so an SMI
 * handler that corrupts general-purpose or SSE state while this runs changes
 * the printed result. The host computes the same value in Rust
 * (smmvmi_tests::workload::cpuburn) and compares.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: cpuburn ITERATIONS\n");
        return 2;
    }
    char *end;
    uint64_t n = strtoull(argv[1], &end, 0);
    if (*argv[1] == '\0' || *end != '\0') {
        fprintf(stderr, "cpuburn: not a number: %s\n", argv[1]);
        return 2;
    }
    uint64_t x = 0, acc = 0;
    double f = 1.0;
    for (uint64_t i = 0; i < n; i++) {
        x += 0x9E3779B97F4A7C15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        f = f * 0.999999 + (double)(z & 0xffff) * 1e-6;
        uint64_t fb;
        memcpy(&fb, &f, sizeof fb);
        acc = (acc * 31 + z) ^ fb;
    }
    printf("%016" PRIx64 "\n", acc);
    return 0;
}
