/*
 * fwcfg -- list QEMU's fw_cfg files through the raw I/O ports, as a
 * compromised guest root would (no kernel driver involved).
 *
 * Selects the file directory (key 0x19) on the selector port 0x510 and
 * reads it from the data port 0x511: a big-endian count, then per file
 * {size BE u32, select BE u16, reserved u16, name[56]}. Prints one line
 * per file: "NAME SIZE". Needs root (iopl(3)). Exits 1 when the device
 * does not answer with its "QEMU" signature.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/io.h>

#define SELECTOR 0x510
#define DATA 0x511

static unsigned read_be(int n)
{
    unsigned v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | inb(DATA);
    return v;
}

int main(void)
{
    if (iopl(3) != 0) {
        fprintf(stderr, "fwcfg: iopl(3) failed: %s (must run as root)\n", strerror(errno));
        return 1;
    }
    char sig[5] = {0};
    outw(0x0000, SELECTOR);
    for (int i = 0; i < 4; i++)
        sig[i] = (char)inb(DATA);
    if (strcmp(sig, "QEMU") != 0) {
        fprintf(stderr, "fwcfg: no fw_cfg signature (read \"%s\")\n", sig);
        return 1;
    }
    outw(0x0019, SELECTOR);
    unsigned count = read_be(4);
    for (unsigned f = 0; f < count && f < 4096; f++) {
        unsigned size = read_be(4);
        (void)read_be(2); /* select */
        (void)read_be(2); /* reserved */
        char name[57] = {0};
        for (int i = 0; i < 56; i++)
            name[i] = (char)inb(DATA);
        printf("%s %u\n", name, size);
    }
    return 0;
}
