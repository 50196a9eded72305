/*
 * snapctl test kernel: a freestanding 64-bit kernel for vmm-core's kernel-boot tests.
 *
 * Entered by the Linux x86 64-bit boot protocol (long mode, RSI = struct boot_params, IF = 0),
 * as an ELF (entry 0x100200) or wrapped as a bzImage (protected-mode code at 0x100000, 64-bit
 * entry at +0x200). It
 *   ring 0 (kmain; kept short: under PVM ring-0 guest code is emulated instruction by
 *   instruction): builds its own identity map (first 4 GiB, 2 MiB pages, user-accessible), GDT,
 *   TSS (I/O bitmap for COM1 from ring 3), IDT, programs the PIC and the PIT (100 Hz), and
 *   `iretq`s to ring 3 with interrupts on;
 *   ring 3 (user_main, runs natively): checks its boot_params against parameters on its own
 *   command line (tk.marker, tk.mem, tk.initrd_size, tk.initrd_fnv, tk.cpus), probes an absent
 *   port and an unbacked MMIO address (must read all ones), prints
 *   "tk: PASS <check>" or "tk: FAIL <check>: ..." on COM1, then writes pages in a deterministic
 *   sequence forever, verifying each page's previous content before overwriting it, printing a
 *   status line every 100 ticks and echoing lines received on COM1 ("tk: rx '...'").
 *
 * With the word "tk.boot_tss" on its command line it loads no TSS of its own: TR stays what the
 * loader set at entry, and ring 3 (IOPL 0, interrupts off: the loader's TSS has no usable RSP0)
 * does port I/O through that TSS's I/O permission bitmap only: COM1, the PIC's mask registers,
 * the PIT's counter, port 0x80. It prints "tk: PASS boot-tss: ..." (or FAIL), sets phase 3, then
 * counts in `steps` forever, reading the PIT now and then. Without such a bitmap the first ring-3
 * port access raises #GP, which cannot be delivered (RSP0 = 0): a triple fault.
 *
 * With the word "tk.full" on its command line, after the checks it writes random pages over all of
 * its RAM above the kernel (up to the end of that e820 range, at most 4 GiB) at full speed instead
 * of the verified sequence: each step stores its number in the first word of a page drawn by a
 * xorshift generator and counts in `steps` (phase 4); it prints a status line every 100 ticks.
 *
 * The status block at 0x100100 (see entry.S, struct status) lets the host read progress.
 * Build: cc -ffreestanding -nostdlib -static ... -T testkernel.ld entry.S testkernel.c
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define PAGE 4096UL
#define HZ 100
#define DATA_MAX_PAGES 4096UL

struct status {
    u64 magic;      /* "TKSTAT01" */
    u64 phase;      /* 1 = checks done, 2 = write loop running, 3 = boot_tss loop, 4 = tk.full loop */
    u64 failures;   /* failed boot checks */
    u64 steps;      /* write steps done */
    u64 ticks;      /* timer interrupts (incremented by isr_timer) */
    u64 bad_pages;  /* pages whose previous content was wrong */
    u64 rx_bytes;   /* bytes received on COM1 */
    u64 data_start; /* first data page */
    u64 data_pages; /* pages in the write sequence (a power of two) */
};

extern volatile struct status status;
extern const u64 isr_table[32];
extern const u64 isr_other[1];
extern void isr_timer(void);
extern void isr_spurious(void);
extern void reload_segments(u16 tr);
extern char __kernel_end[];

/* ---- memory the kernel owns (bss, cleared by _start) ---- */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));
static u8 kernel_stack[16384] __attribute__((aligned(16)));
static u8 user_stack[16384] __attribute__((aligned(16)));
u8 *const kernel_stack_top = kernel_stack + sizeof kernel_stack;
u8 *const user_stack_top = user_stack + sizeof user_stack;
static u64 idt[512] __attribute__((aligned(4096)));
static const u8 *bp; /* boot_params */
static const char *cmdline;
static int boot_tss;   /* tk.boot_tss: run ring 3 on the loader's TSS */
static int full;       /* tk.full: random page writes over all RAM */
static u16 loader_tr;  /* TR selector at entry */

/* 64-bit TSS followed by an I/O permission bitmap allowing ports 0..0x7ff. */
struct tss {
    u32 reserved0;
    u64 rsp0;
    u64 rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[256 + 1];
} __attribute__((packed));
static struct tss tss __attribute__((aligned(16)));

static u64 gdt[7] = {
    0,
    0x00af9b000000ffffUL, /* 0x08 kernel code, 64-bit */
    0x00cf93000000ffffUL, /* 0x10 kernel data */
    0x00cff3000000ffffUL, /* 0x18 user data */
    0x00affb000000ffffUL, /* 0x20 user code, 64-bit */
    0, 0,                 /* 0x28 TSS (16 bytes) */
};

/* gcc may emit these even when freestanding. */
void *memset(void *d, int c, unsigned long n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, unsigned long n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* ---- console ---- */
static void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {
    }
    outb(COM1, (u8)c);
}
static void puts(const char *s) {
    while (*s) putc(*s++);
}
static void putn(const char *s, u64 n) {
    while (n-- && *s) putc(*s++);
}
static void putdec(u64 v) {
    char b[21];
    int i = 20;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(b + i);
}
static void puthex(u64 v) {
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    b[--i] = 'x';
    b[--i] = '0';
    puts(b + i);
}

/* ---- ring 0 ---- */
struct frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

void exception(struct frame *f) {
    puts("tk: EXCEPTION vector=");
    putdec(f->vector);
    puts(" error=");
    puthex(f->error);
    puts(" rip=");
    puthex(f->rip);
    puts(" cs=");
    puthex(f->cs);
    puts("\n");
}

static void set_gate(int v, u64 handler) {
    idt[2 * v] = (handler & 0xffff) | (0x08UL << 16) | (0x8eUL << 40) | (((handler >> 16) & 0xffff) << 48);
    idt[2 * v + 1] = handler >> 32;
}

struct __attribute__((packed)) dtr {
    u16 limit;
    u64 base;
};

/* Whether the word `key` (alone or as key=...) is on the command line. Runs in ring 0: short. */
static int flag(const char *key) {
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        u64 i = 0;
        while (key[i] && p[i] == key[i]) i++;
        if (!key[i] && (p[i] == 0 || p[i] == ' ' || p[i] == '=')) return 1;
    }
    return 0;
}

/* Ring-0 setup; returns the RFLAGS ring 3 starts with. */
u64 kmain(const u8 *boot_params) {
    bp = boot_params;
    cmdline = (const char *)((u64)(*(const u32 *)(bp + 0x228)) | (u64)(*(const u32 *)(bp + 0xc8)) << 32);
    boot_tss = flag("tk.boot_tss");
    full = flag("tk.full");
    __asm__ volatile("str %0" : "=r"(loader_tr));
    /* Identity map of the first 4 GiB with 2 MiB user pages. */
    pml4[0] = (u64)pdpt | 7;
    for (u64 g = 0; g < 4; g++) {
        pdpt[g] = (u64)pd[g] | 7;
        for (u64 e = 0; e < 512; e++) pd[g][e] = (g << 30) | (e << 21) | 0x87;
    }
    __asm__ volatile("mov %0, %%cr3" : : "r"(pml4) : "memory");

    tss.rsp0 = (u64)kernel_stack_top;
    tss.iomap_base = (u16)__builtin_offsetof(struct tss, iomap);
    tss.iomap[256] = 0xff;
    u64 base = (u64)&tss, limit = sizeof tss - 1;
    gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) | (((limit >> 16) & 0xf) << 48) |
             (((base >> 24) & 0xff) << 56);
    gdt[6] = base >> 32;
    struct dtr g = {sizeof gdt - 1, (u64)gdt};
    __asm__ volatile("lgdt %0" : : "m"(g));
    reload_segments(boot_tss ? 0 : 0x28);

    for (int v = 0; v < 256; v++) set_gate(v, isr_other[0]);
    for (int v = 0; v < 32; v++) set_gate(v, isr_table[v]);
    set_gate(0x20, (u64)isr_timer);
    set_gate(0x27, (u64)isr_spurious);
    struct dtr i = {sizeof idt - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(i));

    /* PIC: IRQ 0-7 -> vectors 0x20-0x27, 8-15 -> 0x28-0x2f; only IRQ 0 unmasked. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 4);
    outb(0xa1, 2);
    outb(0x21, 1);
    outb(0xa1, 1);
    outb(0x21, 0xfe);
    outb(0xa1, 0xff);
    /* PIT channel 0, mode 2, HZ. */
    u16 div = (u16)(1193182 / HZ);
    outb(0x43, 0x34);
    outb(0x40, (u8)div);
    outb(0x40, (u8)(div >> 8));
    return boot_tss ? 0x2 : 0x202;
}

/* ---- ring 3 ---- */
static u8 rd8(u64 off) { return bp[off]; }
static u16 rd16(u64 off) { return (u16)(bp[off] | bp[off + 1] << 8); }
static u32 rd32(u64 off) { return (u32)rd16(off) | (u32)rd16(off + 2) << 16; }
static u64 rd64(u64 off) { return (u64)rd32(off) | (u64)rd32(off + 4) << 32; }

/* Value of "key=" on the command line (NULL if absent); *len gets its length. */
static const char *param(const char *key, u64 *len) {
    u64 kl = 0;
    while (key[kl]) kl++;
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        u64 i = 0;
        while (i < kl && p[i] == key[i]) i++;
        if (i == kl && p[kl] == '=') {
            const char *v = p + kl + 1;
            u64 n = 0;
            while (v[n] && v[n] != ' ') n++;
            *len = n;
            return v;
        }
    }
    return 0;
}

/* Number parameter (decimal, or hex with 0x); returns 0 and sets *ok = 0 if absent. */
static u64 num(const char *key, int *ok) {
    u64 n, v = 0;
    const char *s = param(key, &n);
    *ok = s != 0;
    if (!s) return 0;
    if (n > 2 && s[0] == '0' && s[1] == 'x') {
        for (u64 i = 2; i < n; i++) {
            char c = s[i];
            v = v * 16 + (u64)(c <= '9' ? c - '0' : (c | 32) - 'a' + 10);
        }
    } else {
        for (u64 i = 0; i < n; i++) v = v * 10 + (u64)(s[i] - '0');
    }
    return v;
}

static void pass(const char *what) {
    puts("tk: PASS ");
    puts(what);
}
static void fail(const char *what) {
    status.failures++;
    puts("tk: FAIL ");
    puts(what);
}

static u64 fnv1a(const u8 *p, u64 n) {
    u64 h = 0xcbf29ce484222325UL;
    for (u64 i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3UL;
    return h;
}

static u64 sum8(const u8 *p, u64 n) {
    u8 s = 0;
    for (u64 i = 0; i < n; i++) s = (u8)(s + p[i]);
    return s;
}

/* Number of processor entries of the MP table, or -1 if none is found or it is corrupt. */
static long mp_cpus(void) {
    static const u64 ranges[2][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}};
    for (int r = 0; r < 2; r++) {
        for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16) {
            const u8 *f = (const u8 *)a;
            if (f[0] != '_' || f[1] != 'M' || f[2] != 'P' || f[3] != '_') continue;
            if (sum8(f, 16) != 0) return -1;
            const u8 *t = (const u8 *)(u64)(f[4] | f[5] << 8 | f[6] << 16 | (u32)f[7] << 24);
            if (t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P') return -1;
            u64 len = (u64)(t[4] | t[5] << 8);
            if (sum8(t, len) != 0) return -1;
            long cpus = 0;
            for (u64 o = 44; o < len;) {
                if (t[o] == 0) {
                    cpus++;
                    o += 20;
                } else {
                    o += 8;
                }
            }
            return cpus;
        }
    }
    return -1;
}

static u64 e820_usable_end_of(u64 addr) {
    u8 n = rd8(0x1e8);
    for (u8 i = 0; i < n; i++) {
        u64 e = 0x2d0 + 20UL * i;
        u64 a = rd64(e), s = rd64(e + 8);
        if (rd32(e + 16) == 1 && addr >= a && addr < a + s) return a + s;
    }
    return 0;
}

static void boot_checks(void) {
    int ok;
    /* boot_params header */
    if (rd16(0x1fe) == 0xaa55 && rd32(0x202) == 0x53726448) {
        pass("bootparams: version=");
        puthex(rd16(0x206));
        puts(" loader=");
        puthex(rd8(0x210));
        puts(" loadflags=");
        puthex(rd8(0x211));
        puts("\n");
    } else {
        fail("bootparams: no HdrS/0xAA55\n");
    }

    /* command line */
    cmdline = (const char *)((u64)rd32(0x228) | (u64)rd32(0xc8) << 32);
    puts("tk: cmdline: ");
    puts(cmdline);
    puts("\n");
    u64 ml;
    const char *m = param("tk.marker", &ml);
    if (m) {
        pass("cmdline marker=");
        putn(m, ml);
        puts("\n");
    } else {
        fail("cmdline: no tk.marker\n");
    }

    /* e820 */
    u64 mem = num("tk.mem", &ok), usable = 0, top = 0;
    u8 n = rd8(0x1e8);
    for (u8 i = 0; i < n; i++) {
        u64 e = 0x2d0 + 20UL * i;
        u64 a = rd64(e), s = rd64(e + 8);
        u32 t = rd32(e + 16);
        puts("tk: e820 ");
        puthex(a);
        puts("-");
        puthex(a + s);
        puts(" type ");
        putdec(t);
        puts("\n");
        if (t == 1) {
            usable += s;
            if (a + s > top) top = a + s;
        }
    }
    if (ok && n > 0 && top == mem && usable <= mem && usable + (1UL << 20) >= mem) {
        pass("e820: usable=");
        putdec(usable);
        puts(" top=");
        puthex(top);
        puts("\n");
    } else {
        fail("e820: usable=");
        putdec(usable);
        puts(" top=");
        puthex(top);
        puts(" tk.mem=");
        putdec(mem);
        puts("\n");
    }

    /* initrd */
    u64 want_size = num("tk.initrd_size", &ok);
    if (ok) {
        u64 start = (u64)rd32(0x218) | (u64)rd32(0xc0) << 32;
        u64 size = (u64)rd32(0x21c) | (u64)rd32(0xc4) << 32;
        u64 addr_max = rd32(0x22c);
        int ok2;
        u64 want_fnv = num("tk.initrd_fnv", &ok2);
        u64 end_ok = e820_usable_end_of(start) >= start + size;
        u64 h = size == want_size ? fnv1a((const u8 *)start, size) : 0;
        if (start && start % PAGE == 0 && size == want_size && end_ok && (!addr_max || start + size - 1 <= addr_max) &&
            ok2 && h == want_fnv) {
            pass("initrd: at ");
        } else {
            fail("initrd: at ");
        }
        puthex(start);
        puts(" size ");
        putdec(size);
        puts(" fnv ");
        puthex(h);
        puts("\n");
    }

    /* MP table */
    u64 cpus = num("tk.cpus", &ok);
    long found = mp_cpus();
    if (ok && found == (long)cpus) {
        pass("mptable: cpus=");
    } else {
        fail("mptable: cpus=");
    }
    putdec((u64)found);
    puts("\n");

    /* Absent hardware reads as all ones (the VMM's policy for kernel VMs): COM2's line status
     * register, and an unbacked address in the 3-4 GiB hole; writes there are dropped. */
    u8 com2 = inb(0x2f8 + 5);
    outb(0x2f8, 'x');
    volatile u32 *hole = (volatile u32 *)0xd0000000UL;
    u32 mmio = *hole;
    *hole = 0;
    if (com2 == 0xff && mmio == 0xffffffffU) {
        pass("absent: port 0x2fd and MMIO 0xd0000000 read all ones\n");
    } else {
        fail("absent: port 0x2fd=");
        puthex(com2);
        puts(" mmio=");
        puthex(mmio);
        puts("\n");
    }

    puts("tk: checks done, ");
    putdec(status.failures);
    puts(" failed\n");
    status.phase = 1;
}

/* Word i of the page written at step s. */
static u64 word(u64 s, u64 i) {
    u64 x = s * 0x9e3779b97f4a7c15UL + i;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9UL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebUL;
    x ^= x >> 31;
    return x;
}

static char rx_line[80];
static u64 rx_len;

static void poll_rx(void) {
    while (inb(COM1 + 5) & 1) {
        char c = (char)inb(COM1);
        status.rx_bytes++;
        if (c == '\n' || c == '\r') {
            if (rx_len) {
                puts("tk: rx '");
                putn(rx_line, rx_len);
                puts("'\n");
                rx_len = 0;
            }
        } else if (rx_len < sizeof rx_line) {
            rx_line[rx_len++] = c;
        }
    }
}

/* PIT channel 0's current count (latched). */
static u16 pit_count(void) {
    outb(0x43, 0x00);
    u8 lo = inb(0x40);
    return (u16)(lo | inb(0x40) << 8);
}

/* tk.boot_tss: ring 3 on the loader's TSS, IOPL 0, interrupts off; every port access below is
 * allowed only by that TSS's I/O permission bitmap. */
static __attribute__((noreturn)) void user_boot_tss(void) {
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 3);
    puts("tk: ring 3 on the loader's TSS, tr=");
    puthex(loader_tr);
    puts("\n");
    u8 imr1 = inb(0x21), imr2 = inb(0xa1);
    outb(0x80, 0);
    u16 c0 = pit_count(), c1 = c0;
    for (int i = 0; i < 100000 && c1 == c0; i++) c1 = pit_count();
    if (imr1 == 0xfe && imr2 == 0xff && c1 != c0) {
        pass("boot-tss: ");
    } else {
        fail("boot-tss: ");
    }
    puts("com1 pic imr=");
    puthex(imr1);
    puts(",");
    puthex(imr2);
    puts(" pit ");
    putdec(c0);
    puts("->");
    putdec(c1);
    puts("\n");
    status.phase = 3;
    for (u64 n = 1;; n++) {
        status.steps = n;
        if (!(n & 0xfffff)) pit_count();
    }
}

/* tk.full: random page writes over [start, end) at full speed, forever. */
static __attribute__((noreturn)) void user_full(u64 start, u64 end) {
    u64 pages = (end - start) / PAGE;
    status.data_start = start;
    status.data_pages = pages;
    status.phase = 4;
    puts("tk: full: data ");
    puthex(start);
    puts(" pages ");
    putdec(pages);
    puts("\n");
    u64 x = 0x9e3779b97f4a7c15UL, last_tick = status.ticks, last_print = last_tick;
    for (u64 s = status.steps + 1;; s++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *(volatile u64 *)(start + (x % pages) * PAGE) = s;
        status.steps = s;
        u64 t = status.ticks;
        if (t != last_tick) {
            last_tick = t;
            poll_rx();
            if (t - last_print >= HZ) {
                last_print = t;
                puts("tk: t=");
                putdec(t);
                puts(" steps=");
                putdec(s);
                puts("\n");
            }
        }
    }
}

__attribute__((noreturn)) void user_main(void) {
    if (boot_tss) user_boot_tss();
    outb(COM1 + 1, 0); /* no UART interrupts: we poll */
    outb(COM1 + 3, 3); /* 8N1 */
    puts("tk: ring 3, boot_params at ");
    puthex((u64)bp);
    puts("\n");
    boot_checks();

    /* Data: 2 MiB-aligned above the kernel, up to the initrd or the end of its RAM range. */
    u64 start = ((u64)__kernel_end + (2UL << 20) - 1) & ~((2UL << 20) - 1);
    u64 end = e820_usable_end_of(start);
    u64 rd = (u64)rd32(0x218) | (u64)rd32(0xc0) << 32;
    if (rd > start && rd < end) end = rd;
    if (end > (4UL << 30)) end = 4UL << 30; /* the identity map */
    if (full && end > start) user_full(start, end);
    u64 pages = 1;
    while (pages * 2 <= (end > start ? (end - start) / PAGE : 0) && pages * 2 <= DATA_MAX_PAGES) pages *= 2;
    status.data_start = start;
    status.data_pages = pages;
    status.phase = 2;
    puts("tk: write loop: data ");
    puthex(start);
    puts(" pages ");
    putdec(pages);
    puts("\n");

    const u64 stride = 0x9e37UL * 2 + 1; /* odd: a permutation of the pages per sweep */
    u64 last_tick = status.ticks, last_print = last_tick;
    for (u64 s = status.steps + 1;; s++) {
        u64 p = ((s - 1) * stride) & (pages - 1);
        volatile u64 *w = (volatile u64 *)(start + p * PAGE);
        u64 prev = s > pages ? s - pages : 0;
        int good = w[0] == prev;
        for (u64 i = 1; good && i < PAGE / 8; i++) good = w[i] == (prev ? word(prev, i) : 0);
        if (!good) {
            status.bad_pages++;
            puts("tk: BAD page ");
            puthex((u64)w);
            puts(" at step ");
            putdec(s);
            puts(" holds stamp ");
            putdec(w[0]);
            puts(" expected ");
            putdec(prev);
            puts("\n");
        }
        for (u64 i = 1; i < PAGE / 8; i++) w[i] = word(s, i);
        w[0] = s;
        status.steps = s;

        u64 t = status.ticks;
        if (t != last_tick) {
            last_tick = t;
            poll_rx();
            if (t - last_print >= HZ) {
                last_print = t;
                puts("tk: t=");
                putdec(t);
                puts(" steps=");
                putdec(s);
                puts(" bad=");
                putdec(status.bad_pages);
                puts("\n");
            }
        }
    }
}
