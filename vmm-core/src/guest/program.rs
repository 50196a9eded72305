//! The built-in guest program, assembled at run time with iced-x86's `CodeAssembler`.
//!
//! Ring 0 (run by KVM's emulator under PVM, so kept tiny): the entry point (vCPU 0 programs the PIC
//! and PIT; every vCPU then `iretq`s to ring 3 with IOPL 3 and IF=1), the timer handler (count a
//! tick, EOI the PIC) and one stub per other vector that reports an unexpected exception or
//! interrupt on the panic port.
//!
//! Ring 3 (runs natively): fill the slice with generation-0 content, then the step loop (poll
//! requests, print a status line once a second on vCPU 0, rate-limit, write a page, store the slot,
//! report progress every 4096 steps), and the self-check.
//!
//! Register use in ring 3: rbp = vCPU id, r15 = its control block, r14 = first data index of its
//! slice, r13 = working-set pages, r12 = its sequence key, rbx = steps done. Everything else is
//! scratch.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::ctrl::{self, port};
use super::pattern::{GOLDEN, MIX1, MIX2, PFN_MUL, STAMP_MUL, WORD_STEP};
use crate::layout::{self, selector};

/// Timer interrupts per second (PIT channel 0).
pub const TIMER_HZ: u64 = 100;
/// PIT input clock in Hz.
pub const PIT_CLOCK_HZ: u64 = 1_193_182;
/// Vector the PIC's IRQ 0 is remapped to.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the master PIC's spurious IRQ 7.
pub const SPURIOUS_VECTOR: u8 = 0x27;
/// Serial port base.
pub const COM1: u16 = 0x3f8;

/// The assembled guest: code bytes to place at [`layout::CODE_START`] and its entry points.
#[derive(Debug, Clone)]
pub struct GuestProgram {
    /// Machine code, loaded at `layout::CODE_START`.
    pub code: Vec<u8>,
    /// Ring-0 entry (rdi = vCPU id, rsi = user stack top, rsp = kernel stack top).
    pub kernel_entry: u64,
    /// Handler address for every interrupt vector.
    pub vectors: Vec<u64>,
    /// First address of the ring-3 program (everything from here to the end runs in ring 3).
    pub user_start: u64,
}

fn gc(e: IcedError) -> crate::VmError {
    crate::VmError::GuestAssembly(e.to_string())
}

/// Exceptions that push an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

fn abs(off: u64) -> AsmMemoryOperand {
    qword_ptr(ctrl::global(off))
}

/// `x = mix64(x)` using `t` as scratch.
fn mix(a: &mut CodeAssembler, x: AsmRegister64, t: AsmRegister64) -> Result<(), IcedError> {
    a.mov(t, x)?;
    a.shr(t, 30)?;
    a.xor(x, t)?;
    a.mov(t, MIX1)?;
    a.imul_2(x, t)?;
    a.mov(t, x)?;
    a.shr(t, 27)?;
    a.xor(x, t)?;
    a.mov(t, MIX2)?;
    a.imul_2(x, t)?;
    a.mov(t, x)?;
    a.shr(t, 31)?;
    a.xor(x, t)?;
    Ok(())
}

struct Labels {
    user_entry: CodeLabel,
    idx_to_gpa: CodeLabel,
    step_page: CodeLabel,
    page_base: CodeLabel,
    write_page: CodeLabel,
    check_page: CodeLabel,
    verify: CodeLabel,
    putc: CodeLabel,
    puts: CodeLabel,
    print_dec: CodeLabel,
    print_hex: CodeLabel,
    lock: CodeLabel,
    unlock: CodeLabel,
    print_status: CodeLabel,
    s_status: CodeLabel,
    s_ticks: CodeLabel,
    s_steps: CodeLabel,
    s_vcpu: CodeLabel,
    s_pass: CodeLabel,
    s_fail: CodeLabel,
    s_page: CodeLabel,
}

/// Assembles the built-in guest.
pub fn assemble() -> Result<GuestProgram, crate::VmError> {
    build().map_err(gc)
}

fn build() -> Result<GuestProgram, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut l = Labels {
        user_entry: a.create_label(),
        idx_to_gpa: a.create_label(),
        step_page: a.create_label(),
        page_base: a.create_label(),
        write_page: a.create_label(),
        check_page: a.create_label(),
        verify: a.create_label(),
        putc: a.create_label(),
        puts: a.create_label(),
        print_dec: a.create_label(),
        print_hex: a.create_label(),
        lock: a.create_label(),
        unlock: a.create_label(),
        print_status: a.create_label(),
        s_status: a.create_label(),
        s_ticks: a.create_label(),
        s_steps: a.create_label(),
        s_vcpu: a.create_label(),
        s_pass: a.create_label(),
        s_fail: a.create_label(),
        s_page: a.create_label(),
    };
    let mut kernel_entry = a.create_label();
    let mut vec_labels: Vec<CodeLabel> =
        (0..layout::IDT_ENTRIES).map(|_| a.create_label()).collect();

    // ---------------- ring 0 ----------------
    a.set_label(&mut kernel_entry)?;
    let mut to_user = a.create_label();
    a.test(edi, edi)?;
    a.jnz(to_user)?;
    // PIC: ICW1..ICW4, IRQ0-7 -> 0x20.., IRQ8-15 -> 0x28.., then mask everything but IRQ 0.
    for (p, v) in [
        (0x20u8, 0x11u8),
        (0xA0, 0x11),
        (0x21, TIMER_VECTOR),
        (0xA1, TIMER_VECTOR + 8),
        (0x21, 4),
        (0xA1, 2),
        (0x21, 1),
        (0xA1, 1),
        (0x21, 0xFE),
        (0xA1, 0xFF),
    ] {
        a.mov(al, u32::from(v))?;
        a.out(u32::from(p), al)?;
    }
    // PIT channel 0, lobyte/hibyte, mode 2 (rate generator).
    let divisor = (PIT_CLOCK_HZ + TIMER_HZ / 2) / TIMER_HZ;
    a.mov(al, 0x34u32)?;
    a.out(0x43u32, al)?;
    a.mov(al, (divisor & 0xff) as u32)?;
    a.out(0x40u32, al)?;
    a.mov(al, (divisor >> 8) as u32)?;
    a.out(0x40u32, al)?;
    a.set_label(&mut to_user)?;
    a.push(i32::from(selector::USER_DATA | 3))?;
    a.push(rsi)?;
    a.push(0x3202i32)?; // IF | IOPL 3 | reserved bit 1
    a.push(i32::from(selector::USER_CODE | 3))?;
    a.lea(rax, qword_ptr(l.user_entry))?;
    a.push(rax)?;
    a.iretq()?;

    // Timer: count, EOI, return. Keep it short: every instruction here is emulated under PVM.
    let timer = usize::from(TIMER_VECTOR);
    a.set_label(&mut vec_labels[timer])?;
    a.push(rax)?;
    a.lock().inc(abs(ctrl::TICKS))?;
    a.mov(al, 0x20u32)?;
    a.out(0x20u32, al)?;
    a.pop(rax)?;
    a.iretq()?;
    // Spurious IRQ 7: no EOI.
    a.set_label(&mut vec_labels[usize::from(SPURIOUS_VECTOR)])?;
    a.iretq()?;
    // Everything else: report vector + frame on the panic port and stop.
    let mut panic_common = a.create_label();
    for v in 0..=255u8 {
        if v == TIMER_VECTOR || v == SPURIOUS_VECTOR {
            continue;
        }
        a.set_label(&mut vec_labels[usize::from(v)])?;
        if !has_error_code(v) {
            a.push(0i32)?;
        }
        a.push(i32::from(v))?;
        a.jmp(panic_common)?;
    }
    a.set_label(&mut panic_common)?;
    a.mov(rax, qword_ptr(rsp))?;
    a.mov(dx, u32::from(port::PANIC))?;
    a.out(dx, eax)?;
    let mut dead = a.create_label();
    a.set_label(&mut dead)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(dead)?;

    // ---------------- ring 3 ----------------
    user_program(&mut a, &mut l)?;
    subroutines(&mut a, &mut l)?;

    let base = layout::CODE_START;
    let res = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let vectors = vec_labels
        .iter()
        .map(|lb| res.label_ip(lb))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GuestProgram {
        kernel_entry: res.label_ip(&kernel_entry)?,
        user_start: res.label_ip(&l.user_entry)?,
        vectors,
        code: res.inner.code_buffer,
    })
}

fn out_port(a: &mut CodeAssembler, p: u16) -> Result<(), IcedError> {
    a.mov(dx, u32::from(p))?;
    a.out(dx, eax)
}

fn user_program(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.user_entry)?;
    a.mov(rbp, rdi)?;
    a.mov(r15, rdi)?;
    a.shl(r15, 6)?;
    a.add(r15, (layout::CONTROL_PAGE + ctrl::VCPU_BASE) as i32)?;
    a.mov(rax, abs(ctrl::P_SLICE))?;
    a.imul_2(rax, rbp)?;
    a.mov(r14, rax)?;
    a.mov(r13, abs(ctrl::P_WS))?;
    a.mov(r12, qword_ptr(r15 + ctrl::V_KEY as i32))?;

    // Generation-0 fill (resumable: progress lives in the control block).
    a.mov(rbx, qword_ptr(r15 + ctrl::V_FILL as i32))?;
    let mut fill = a.create_label();
    let mut fill_done = a.create_label();
    a.set_label(&mut fill)?;
    a.cmp(rbx, abs(ctrl::P_SLICE))?;
    a.jae(fill_done)?;
    a.lea(rax, qword_ptr(r14 + rbx))?;
    a.call(l.idx_to_gpa)?;
    a.mov(rdi, rax)?;
    a.xor(eax, eax)?;
    a.call(l.write_page)?;
    a.inc(rbx)?;
    a.mov(qword_ptr(r15 + ctrl::V_FILL as i32), rbx)?;
    a.jmp(fill)?;
    a.set_label(&mut fill_done)?;
    a.mov(eax, ebx)?;
    out_port(a, port::FILL_DONE)?;
    a.mov(rbx, qword_ptr(r15 + ctrl::V_SLOT as i32))?;
    a.mov(rax, abs(ctrl::TICKS))?;
    a.mov(qword_ptr(r15 + ctrl::V_RATE_T0 as i32), rax)?;
    a.mov(qword_ptr(r15 + ctrl::V_RATE_S0 as i32), rbx)?;

    let mut main = a.create_label();
    let mut no_print = a.create_label();
    let mut do_step = a.create_label();
    let mut idle = a.create_label();
    let mut do_check = a.create_label();
    let mut poweroff = a.create_label();
    a.set_label(&mut main)?;
    a.mov(rax, abs(ctrl::CHECK_REQ))?;
    a.cmp(rax, qword_ptr(r15 + ctrl::V_CHECK_ACK as i32))?;
    a.jne(do_check)?;
    a.cmp(abs(ctrl::POWEROFF_REQ), 0)?;
    a.jne(poweroff)?;
    a.test(rbp, rbp)?;
    a.jnz(no_print)?;
    a.mov(rax, abs(ctrl::TICKS))?;
    a.sub(rax, abs(ctrl::LAST_PRINT))?;
    a.cmp(rax, TIMER_HZ as i32)?;
    a.jb(no_print)?;
    a.mov(rax, abs(ctrl::TICKS))?;
    a.mov(abs(ctrl::LAST_PRINT), rax)?;
    a.call(l.print_status)?;
    a.set_label(&mut no_print)?;
    a.mov(rax, abs(ctrl::P_MODE))?;
    a.cmp(rax, ctrl::MODE_FULL as i32)?;
    a.je(do_step)?;
    a.cmp(rax, ctrl::MODE_RATE as i32)?;
    a.jne(idle)?;
    // allowed = s0 + (ticks - t0) * rate / HZ
    a.mov(rax, abs(ctrl::TICKS))?;
    a.sub(rax, qword_ptr(r15 + ctrl::V_RATE_T0 as i32))?;
    a.mul(abs(ctrl::P_RATE))?;
    a.mov(rcx, TIMER_HZ)?;
    a.div(rcx)?;
    a.add(rax, qword_ptr(r15 + ctrl::V_RATE_S0 as i32))?;
    a.cmp(rbx, rax)?;
    a.jb(do_step)?;
    a.set_label(&mut idle)?;
    out_port(a, port::IDLE)?;
    a.jmp(main)?;

    a.set_label(&mut do_step)?;
    a.lea(rax, qword_ptr(rbx + 1))?;
    a.call(l.step_page)?;
    a.lea(rax, qword_ptr(r14 + rdx))?;
    a.call(l.idx_to_gpa)?;
    a.mov(rdi, rax)?;
    a.lea(rax, qword_ptr(rbx + 1))?;
    a.call(l.write_page)?;
    a.inc(rbx)?;
    a.mov(qword_ptr(r15 + ctrl::V_SLOT as i32), rbx)?;
    a.test(ebx, 0xFFFu32)?;
    a.jnz(main)?;
    a.mov(eax, ebx)?;
    out_port(a, port::PROGRESS)?;
    a.jmp(main)?;

    a.set_label(&mut poweroff)?;
    out_port(a, port::POWEROFF)?;
    a.jmp(main)?;

    // Self-check: verify, publish verdict, acknowledge the request, report, print.
    a.set_label(&mut do_check)?;
    a.push(rax)?;
    a.call(l.verify)?;
    a.mov(qword_ptr(r15 + ctrl::V_CHECK_STATUS as i32), rax)?;
    a.mov(qword_ptr(r15 + ctrl::V_CHECK_BAD as i32), rdx)?;
    a.pop(rcx)?;
    a.mov(qword_ptr(r15 + ctrl::V_CHECK_ACK as i32), rcx)?;
    a.mov(r10, rdx)?;
    a.mov(r11, rax)?;
    out_port(a, port::CHECK)?;
    a.call(l.lock)?;
    a.lea(rsi, qword_ptr(l.s_vcpu))?;
    a.call(l.puts)?;
    a.mov(rax, rbp)?;
    a.call(l.print_dec)?;
    let mut failed = a.create_label();
    let mut printed = a.create_label();
    a.cmp(r11, ctrl::CHECK_PASS as i32)?;
    a.jne(failed)?;
    a.lea(rsi, qword_ptr(l.s_pass))?;
    a.call(l.puts)?;
    a.mov(rax, rbx)?;
    a.call(l.print_dec)?;
    a.jmp(printed)?;
    a.set_label(&mut failed)?;
    a.lea(rsi, qword_ptr(l.s_fail))?;
    a.call(l.puts)?;
    a.mov(rax, r11)?;
    a.call(l.print_dec)?;
    a.lea(rsi, qword_ptr(l.s_page))?;
    a.call(l.puts)?;
    a.mov(rax, r10)?;
    a.call(l.print_hex)?;
    a.set_label(&mut printed)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.call(l.unlock)?;
    a.jmp(main)?;
    Ok(())
}

fn subroutines(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    // idx_to_gpa: rax = data index -> rax = gpa (skipping the 3-4 GiB hole). Clobbers rcx.
    a.set_label(&mut l.idx_to_gpa)?;
    a.shl(rax, 12)?;
    a.add(rax, layout::DATA_START as i32)?;
    a.mov(rcx, layout::LOW_RAM_END)?;
    a.cmp(rax, rcx)?;
    let mut low = a.create_label();
    a.jb(low)?;
    a.mov(rcx, layout::HIGH_RAM_START - layout::LOW_RAM_END)?;
    a.add(rax, rcx)?;
    a.set_label(&mut low)?;
    a.ret()?;

    // step_page: rax = s -> rdx = working-set index. Clobbers rax, rcx.
    a.set_label(&mut l.step_page)?;
    a.mov(rcx, GOLDEN)?;
    a.imul_2(rax, rcx)?;
    a.add(rax, r12)?;
    mix(a, rax, rcx)?;
    a.mul(r13)?;
    a.ret()?;

    // page_base: rax = stamp, rdi = gpa -> rcx = base. Clobbers rdx, r8.
    a.set_label(&mut l.page_base)?;
    a.mov(rcx, STAMP_MUL)?;
    a.imul_2(rcx, rax)?;
    a.mov(rdx, rdi)?;
    a.shr(rdx, 12)?;
    a.mov(r8, PFN_MUL)?;
    a.imul_2(rdx, r8)?;
    a.xor(rcx, rdx)?;
    mix(a, rcx, rdx)?;
    a.ret()?;

    // write_page: rax = stamp, rdi = gpa. Clobbers rcx, rdx, r8, r9.
    a.set_label(&mut l.write_page)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.call(l.page_base)?;
    a.mov(rdx, WORD_STEP)?;
    // qword 1 alone, then qwords 2..=511 in pairs.
    a.add(rcx, rdx)?;
    a.mov(qword_ptr(rdi + 8), rcx)?;
    a.lea(r8, qword_ptr(rdi + 16))?;
    a.lea(r9, qword_ptr(rdi + 4096))?;
    let mut wl = a.create_label();
    a.set_label(&mut wl)?;
    a.add(rcx, rdx)?;
    a.mov(qword_ptr(r8), rcx)?;
    a.add(rcx, rdx)?;
    a.mov(qword_ptr(r8 + 8), rcx)?;
    a.add(r8, 16)?;
    a.cmp(r8, r9)?;
    a.jb(wl)?;
    a.ret()?;

    // check_page: rax = stamp, rdi = gpa -> eax = 0 if the page matches. Clobbers rcx, rdx, r8, r9.
    a.set_label(&mut l.check_page)?;
    let mut bad = a.create_label();
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(bad)?;
    a.call(l.page_base)?;
    a.mov(rdx, WORD_STEP)?;
    a.lea(r8, qword_ptr(rdi + 8))?;
    a.lea(r9, qword_ptr(rdi + 4096))?;
    let mut cloop = a.create_label();
    a.set_label(&mut cloop)?;
    a.add(rcx, rdx)?;
    a.cmp(qword_ptr(r8), rcx)?;
    a.jne(bad)?;
    a.add(r8, 8)?;
    a.cmp(r8, r9)?;
    a.jb(cloop)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut bad)?;
    a.mov(eax, 1u32)?;
    a.ret()?;

    // verify: rbx = steps done -> rax = verdict (CHECK_*), rdx = first bad gpa. Clobbers scratch.
    a.set_label(&mut l.verify)?;
    let mut p1 = a.create_label();
    let mut p2 = a.create_label();
    let mut p2l = a.create_label();
    let mut content = a.create_label();
    let mut pass = a.create_label();
    let mut stale = a.create_label();
    let mut newer = a.create_label();
    let mut garbage = a.create_label();
    // Pass 1: every step s <= slot left its page with a stamp >= s.
    a.mov(r10, 1u64)?;
    a.set_label(&mut p1)?;
    a.cmp(r10, rbx)?;
    a.ja(p2)?;
    a.mov(rax, r10)?;
    a.call(l.step_page)?;
    a.lea(rax, qword_ptr(r14 + rdx))?;
    a.call(l.idx_to_gpa)?;
    a.cmp(qword_ptr(rax), r10)?;
    a.jb(stale)?;
    a.inc(r10)?;
    a.jmp(p1)?;
    // Pass 2: every page's stamp t is <= slot, was written by step t (or is the fill), and the
    // content is exactly that of stamp t. With pass 1 this makes t the page's last write.
    a.set_label(&mut p2)?;
    a.xor(r10d, r10d)?;
    a.set_label(&mut p2l)?;
    a.cmp(r10, abs(ctrl::P_SLICE))?;
    a.jae(pass)?;
    a.lea(rax, qword_ptr(r14 + r10))?;
    a.call(l.idx_to_gpa)?;
    a.mov(rdi, rax)?;
    a.mov(r11, qword_ptr(rdi))?;
    a.cmp(r11, rbx)?;
    a.ja(newer)?;
    a.test(r11, r11)?;
    a.jz(content)?;
    a.cmp(r10, r13)?;
    a.jae(garbage)?;
    a.mov(rax, r11)?;
    a.call(l.step_page)?;
    a.cmp(rdx, r10)?;
    a.jne(garbage)?;
    a.set_label(&mut content)?;
    a.mov(rax, r11)?;
    a.call(l.check_page)?;
    a.test(eax, eax)?;
    a.jnz(garbage)?;
    a.inc(r10)?;
    a.jmp(p2l)?;
    a.set_label(&mut pass)?;
    a.mov(eax, ctrl::CHECK_PASS as u32)?;
    a.xor(edx, edx)?;
    a.ret()?;
    a.set_label(&mut stale)?;
    a.mov(rdx, rax)?;
    a.mov(eax, ctrl::CHECK_STALE as u32)?;
    a.ret()?;
    a.set_label(&mut newer)?;
    a.mov(rdx, rdi)?;
    a.mov(eax, ctrl::CHECK_NEWER as u32)?;
    a.ret()?;
    a.set_label(&mut garbage)?;
    a.mov(rdx, rdi)?;
    a.mov(eax, ctrl::CHECK_GARBAGE as u32)?;
    a.ret()?;

    // putc: al = byte. Clobbers dx. (The emulated UART is always ready, so LSR is not polled.)
    a.set_label(&mut l.putc)?;
    a.mov(dx, u32::from(COM1))?;
    a.out(dx, al)?;
    a.ret()?;

    // puts: rsi = NUL-terminated string. Clobbers rax, rdx, rsi.
    a.set_label(&mut l.puts)?;
    let pl = l.puts;
    let mut pe = a.create_label();
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(pe)?;
    a.call(l.putc)?;
    a.inc(rsi)?;
    a.jmp(pl)?;
    a.set_label(&mut pe)?;
    a.ret()?;

    // print_dec: rax = value. Clobbers rax, rcx, rdx, rdi, r8.
    a.set_label(&mut l.print_dec)?;
    a.sub(rsp, 32)?;
    a.lea(rdi, qword_ptr(rsp + 32))?;
    a.mov(r8, 10u64)?;
    let mut dl_ = a.create_label();
    a.set_label(&mut dl_)?;
    a.xor(edx, edx)?;
    a.div(r8)?;
    a.add(dl, b'0' as u32)?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(dl_)?;
    let mut dp = a.create_label();
    a.set_label(&mut dp)?;
    a.mov(al, byte_ptr(rdi))?;
    a.call(l.putc)?;
    a.inc(rdi)?;
    a.lea(rcx, qword_ptr(rsp + 32))?;
    a.cmp(rdi, rcx)?;
    a.jb(dp)?;
    a.add(rsp, 32)?;
    a.ret()?;

    // print_hex: rax = value, printed as 0x + 16 digits. Clobbers rax, rcx, rdx, rdi, r8.
    a.set_label(&mut l.print_hex)?;
    a.mov(r8, rax)?;
    a.mov(al, b'0' as u32)?;
    a.call(l.putc)?;
    a.mov(al, b'x' as u32)?;
    a.call(l.putc)?;
    a.mov(ecx, 16u32)?;
    let mut hl = a.create_label();
    let mut hd = a.create_label();
    a.set_label(&mut hl)?;
    a.rol(r8, 4)?;
    a.mov(eax, r8d)?;
    a.and(eax, 0xFu32)?;
    a.add(eax, b'0' as u32)?;
    a.cmp(eax, b'9' as u32)?;
    a.jbe(hd)?;
    a.add(eax, (b'a' - b'9' - 1) as u32)?;
    a.set_label(&mut hd)?;
    a.call(l.putc)?;
    a.dec(ecx)?;
    a.jnz(hl)?;
    a.ret()?;

    // lock / unlock the serial spin lock. lock clobbers rax.
    a.set_label(&mut l.lock)?;
    let spin = l.lock;
    let mut got = a.create_label();
    a.mov(eax, 1u32)?;
    a.xchg(abs(ctrl::SERIAL_LOCK), rax)?;
    a.test(rax, rax)?;
    a.jz(got)?;
    a.pause()?;
    a.jmp(spin)?;
    a.set_label(&mut got)?;
    a.ret()?;
    a.set_label(&mut l.unlock)?;
    a.mov(abs(ctrl::SERIAL_LOCK), 0)?;
    a.ret()?;

    // print_status (vCPU 0): "snapguest: t=<s>s ticks=<n> steps=<v0> <v1> ...".
    a.set_label(&mut l.print_status)?;
    a.call(l.lock)?;
    a.lea(rsi, qword_ptr(l.s_status))?;
    a.call(l.puts)?;
    a.mov(rax, abs(ctrl::TICKS))?;
    a.xor(edx, edx)?;
    a.mov(rcx, TIMER_HZ)?;
    a.div(rcx)?;
    a.call(l.print_dec)?;
    a.lea(rsi, qword_ptr(l.s_ticks))?;
    a.call(l.puts)?;
    a.mov(rax, abs(ctrl::TICKS))?;
    a.call(l.print_dec)?;
    a.lea(rsi, qword_ptr(l.s_steps))?;
    a.call(l.puts)?;
    a.xor(r10d, r10d)?;
    let mut vl = a.create_label();
    let mut vd = a.create_label();
    a.set_label(&mut vl)?;
    a.mov(rax, r10)?;
    a.shl(rax, 6)?;
    a.mov(
        rax,
        qword_ptr(rax + (layout::CONTROL_PAGE + ctrl::VCPU_BASE + ctrl::V_SLOT) as i32),
    )?;
    a.call(l.print_dec)?;
    a.inc(r10)?;
    a.cmp(r10, abs(ctrl::P_VCPUS))?;
    a.jae(vd)?;
    a.mov(al, b' ' as u32)?;
    a.call(l.putc)?;
    a.jmp(vl)?;
    a.set_label(&mut vd)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.call(l.unlock)?;
    a.ret()?;

    for (lb, s) in [
        (&mut l.s_status, "snapguest: t="),
        (&mut l.s_ticks, "s ticks="),
        (&mut l.s_steps, " steps="),
        (&mut l.s_vcpu, "snapguest: vcpu "),
        (&mut l.s_pass, " self-check PASS steps="),
        (&mut l.s_fail, " self-check FAIL code="),
        (&mut l.s_page, " page="),
    ] {
        a.set_label(lb)?;
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        a.db(&b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_fits() {
        let p = assemble().unwrap();
        assert!((p.code.len() as u64) < layout::CODE_MAX_SIZE);
        assert_eq!(p.vectors.len(), 256);
        assert!(p.kernel_entry >= layout::CODE_START);
    }
}
