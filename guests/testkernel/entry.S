/* Test kernel entry, interrupt stubs and the status block. See testkernel.c. */
#define STATUS_TICKS 32

    .section .head, "awx"
    .fill 0x100, 1, 0xf4            /* 32-bit entry: not supported, HLT */
    .globl status
status:                             /* 0x100100: struct status (testkernel.c) */
    .ascii "TKSTAT01"
    .fill 0xf8, 1, 0

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:                             /* 64-bit boot protocol: RSI = boot_params, IF = 0 */
    cli
    mov %rsi, %r15
    lea __bss_start(%rip), %rdi     /* clear bss (stacks, page tables) */
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    mov kernel_stack_top(%rip), %rsp
    mov %r15, %rdi
    call kmain                      /* ring 0 setup; returns ring 3's RFLAGS */
    pushq $0x1b                     /* SS: user data | RPL 3 */
    pushq user_stack_top(%rip)
    pushq %rax                      /* RFLAGS: IOPL 0; IF unless tk.boot_tss */
    pushq $0x23                     /* CS: user code | RPL 3 */
    lea user_main(%rip), %rax
    pushq %rax
    iretq

    .globl reload_segments
reload_segments:                    /* after lgdt: CS = 0x08 via far return, data = 0x10, */
                                    /* TR = %di unless 0 (then TR stays what the loader set) */
    pushq $0x08
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    test %di, %di
    jz 3f
    ltr %di
3:  ret

    .macro ISR_NOERR n
isr\n:
    pushq $0
    pushq $\n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr\n:
    pushq $\n
    jmp isr_common
    .endm

    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31
    ISR_NOERR 255                   /* any other vector: unexpected */

isr_common:                         /* frame: vector, error, rip, cs, rflags, rsp, ss */
    mov %rsp, %rdi
    and $-16, %rsp
    call exception                  /* prints and never returns */
2:  cli
    hlt
    jmp 2b

    .globl isr_timer
isr_timer:                          /* PIT tick (IRQ 0): count, EOI the master PIC */
    lock incq status+STATUS_TICKS(%rip)
    push %rax
    mov $0x20, %al
    outb %al, $0x20
    pop %rax
    iretq

    .globl isr_spurious
isr_spurious:                       /* PIC spurious IRQ 7: no EOI */
    iretq

    .section .rodata
    .globl isr_table
isr_table:
    .quad isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7
    .quad isr8, isr9, isr10, isr11, isr12, isr13, isr14, isr15
    .quad isr16, isr17, isr18, isr19, isr20, isr21, isr22, isr23
    .quad isr24, isr25, isr26, isr27, isr28, isr29, isr30, isr31
    .globl isr_other
isr_other:
    .quad isr255

    .section .note.GNU-stack, "", @progbits
