/*
 * smi CMD [DATA] -- raise an SMI from guest user space.
 *
 * Writes DATA (default 0) to the APM status port 0xB3, then CMD to the APM
 * control port 0xB2; on q35 with APMC_EN set the chipset raises an SMI.
 * Needs root (iopl(3)). Exits 0 once both writes are done: under TCG the SMI
 * is delivered at the next translation-block boundary, so callers must
 * hand-shake through memory (the mailbox), never assume it already ran.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

static int parse_byte(const char *s, unsigned *out)
{
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    if (*s == '\0' || *end != '\0' || v > 0xff)
        return -1;
    *out = (unsigned)v;
    return 0;
}

int main(int argc, char **argv)
{
    unsigned cmd, data = 0;
    if (argc < 2 || argc > 3 || parse_byte(argv[1], &cmd) ||
        (argc == 3 && parse_byte(argv[2], &data))) {
        fprintf(stderr, "usage: smi CMD [DATA]   (bytes, e.g. smi 0x10 0)\n");
        return 2;
    }
    if (iopl(3) != 0) {
        fprintf(stderr, "smi: iopl(3) failed: %s (must run as root)\n", strerror(errno));
        return 1;
    }
    outb((unsigned char)data, 0xB3);
    outb((unsigned char)cmd, 0xB2);
    return 0;
}
