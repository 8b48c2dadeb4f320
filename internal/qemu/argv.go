// Package qemu builds QEMU's command line from a Spec, and prepares what QEMU
// opens: the qcow2 disk (created once, never overwritten) and the VM's own
// OVMF vars file (copied once from the template, never shared). Argv is a
// pure function; the file helpers do their I/O and nothing else.
package qemu

import (
	"fmt"
	"strconv"
	"strings"
)

// FirstFD is the descriptor number of the first file the runner hands QEMU
// (after stdin, stdout and stderr).
const FirstFD = 3

// The fdsets QEMU finds its descriptors in: KVM, the disk, the NVRAM.
const (
	KVMFDSet  = 1
	DiskFDSet = 2
	VarsFDSet = 3
)

// Sandbox is the seccomp policy QEMU runs under: no obsolete syscalls, no
// setuid or capability games, no fork or exec, no scheduler or resource
// changes.
const Sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// TCGCacheMiB bounds the TCG translation cache, so that emulation fits the
// overhead the memory budget allows.
const TCGCacheMiB = 128

// Spec is everything the command line depends on. The runner fills it from
// the config and from what preparation found (memory limit, empty disk).
type Spec struct {
	Name      string
	MAC       string // the NIC's (config.MAC: bound to the VM's uid)
	Accel     string // "kvm" or "tcg"
	KVMFD     int    // descriptor number of the KVM device inside QEMU, for Accel "kvm"
	CPUModel  string
	CPUs      int
	MemoryMiB int64

	Firmware string // "uefi", "uefi-secure" or "bios"
	// Windows is the Windows profile: Hyper-V enlightenments (under KVM),
	// the RTC in local time, a USB tablet, and devices Windows' installer
	// has drivers for (SATA disk, e1000e NIC). DriversISO is a second
	// CD-ROM, e.g. the virtio-win drivers.
	Windows    bool
	DriversISO string
	// TPMSocket is swtpm's control socket (empty: no TPM).
	TPMSocket string
	OVMFCode  string
	OVMFVars  string

	Disk      string
	DiskCache string // "none", "writeback" or "writethrough"
	// DiskFDs and VarsFDs are descriptor numbers (inside QEMU) of the disk
	// and the NVRAM, which the runner opened and checked: QEMU then opens
	// them through fdsets, never by name, so a file swapped in after the
	// check is never what it uses. QEMU needs one read-only and one
	// read-write descriptor of each, with O_DIRECT for cache=none.
	DiskFDs, VarsFDs []int
	ISO              string
	BootFromISO      bool // the disk is still empty: boot the install medium first
	// Seed is the cloud-init NoCloud image (on the run tmpfs), read-only;
	// SeedBus is "virtio" (a virtio disk, what cloud kernels see) or
	// "cdrom" (an AHCI CD-ROM, what Windows sees without drivers).
	Seed, SeedBus string

	Kernel, Initrd, Cmdline string

	// Net is NetUser (also when empty), NetTAP or NetNone. User mode forwards
	// Forwards from the container's interfaces to the guest; tap mode uses
	// the TAP descriptor (and vhost-net's, when not zero).
	Net            string
	Forwards       []Forward
	TAPFD, VhostFD int

	QMPSocket    string // the runner's monitor
	HealthSocket string // the health check's monitor
	// QMPFD and HealthFD, when set, are those sockets already listening,
	// made by the runner and handed over: QEMU serves on them at once, and
	// the runner's connection needs no polling for the socket to appear.
	QMPFD, HealthFD int
	// AgentSocket, when set, is the QEMU guest agent's channel: a
	// virtio-serial port named org.qemu.guest_agent.0, which QEMU joins
	// to this unix socket (AgentFD: listening already, handed over), for
	// the runner to connect to.
	AgentSocket string
	AgentFD     int
	// VNCSocket, when set, gives the VM a screen (standard VGA) and a
	// pointer that tracks (a USB tablet), shown on a VNC display on this
	// unix socket, for the runner's web console. QEMU opens no TCP port.
	VNCSocket string

	// Incoming starts QEMU waiting for a migration (-incoming defer): it
	// runs the guest it is sent, not a new one; the runner says from where,
	// and starts it (-S: it stays paused until then).
	Incoming bool

	Extra []string
}

// Argv is QEMU's argument list, without the program name.
func Argv(s Spec) []string {
	a := []string{
		"-name", "guest=" + esc(s.Name) + ",debug-threads=on",
		"-no-user-config", "-nodefaults",
		"-sandbox", Sandbox,
		"-msg", "timestamp=on",
		"-display", "none",
	}
	a = append(a, accel(s)...)
	a = append(a, machine(s)...)
	a = append(a,
		"-cpu", cpu(s),
		"-smp", strconv.Itoa(s.CPUs),
		"-m", strconv.FormatInt(s.MemoryMiB, 10)+"M",
	)
	a = append(a, firmware(s)...)
	a = append(a, panicDevice()...)
	a = append(a, tpm(s)...)
	a = append(a, clock(s)...)
	a = append(a, disks(s)...)
	a = append(a, kernel(s)...)
	a = append(a, nic(s)...)
	a = append(a, screen(s)...)
	a = append(a, guestAgent(s)...)
	a = append(a, monitors(s)...)
	if s.Incoming {
		a = append(a, "-incoming", "defer", "-S")
	}
	return append(a, s.Extra...)
}

func accel(s Spec) []string {
	if s.Accel == "tcg" {
		return []string{"-accel", "tcg,tb-size=" + strconv.Itoa(TCGCacheMiB)}
	}
	// QEMU never opens /dev/kvm itself: it gets the descriptor the runner
	// opened, or the broker passed, through an fdset.
	return []string{
		"-add-fd", fmt.Sprintf("fd=%d,set=%d,opaque=kvm", s.KVMFD, KVMFDSet),
		"-accel", fmt.Sprintf("kvm,device=/dev/fdset/%d", KVMFDSet),
	}
}

func machine(s Spec) []string {
	m := "q35"
	switch s.Firmware {
	case "uefi":
		m += ",pflash0=ovmf-code,pflash1=ovmf-vars"
	case "uefi-secure":
		// Secure Boot's variables are safe from the guest only when the
		// flash can be written from SMM alone: System Management Mode on,
		// the flash marked secure.
		return []string{"-machine", "q35,smm=on,pflash0=ovmf-code,pflash1=ovmf-vars",
			"-global", "driver=cfi.pflash01,property=secure,value=on"}
	}
	return []string{"-machine", m}
}

// panicDevice gives the guest a pvpanic device, through which its kernel
// reports a panic. QEMU then pauses the VM and emits GUEST_PANICKED; the
// runner stops it and exits with its own code, so that Swarm restarts it.
func panicDevice() []string {
	return []string{"-action", "panic=pause", "-device", "pvpanic"}
}

// tpm attaches the VM's TPM 2.0 as a CRB device: swtpm, which the runner
// started, listening on its control socket (bound by the runner before
// either started). QEMU hands swtpm the data channel over it; QEMU 10 with
// the chardev given as a connected descriptor instead failed that step
// ("Failed to send CMD_SET_DATAFD: Invalid argument"), by path it works.
func tpm(s Spec) []string {
	if s.TPMSocket == "" {
		return nil
	}
	return []string{
		"-chardev", "socket,id=tpmctrl,path=" + esc(s.TPMSocket),
		"-tpmdev", "emulator,id=tpm0,chardev=tpmctrl",
		"-device", "tpm-crb,tpmdev=tpm0",
	}
}

// HyperV are the Hyper-V enlightenments of the Windows profile, those
// QEMU's documentation (docs/system/i386/hyperv.rst) recommends for
// current Windows; KVM provides them, so they are given only under kvm.
const HyperV = "hv-relaxed,hv-vapic,hv-spinlocks=0x1fff,hv-vpindex,hv-runtime,hv-synic,hv-stimer,hv-time,hv-frequencies,hv-reset,hv-tlbflush,hv-ipi"

func cpu(s Spec) string {
	if s.Windows && s.Accel != "tcg" {
		return s.CPUModel + "," + HyperV
	}
	return s.CPUModel
}

// clock: Windows keeps the RTC in local time; under KVM late timer ticks
// are delivered late rather than lost.
func clock(s Spec) []string {
	if !s.Windows {
		return nil
	}
	a := []string{"-rtc", "base=localtime,driftfix=slew"}
	if s.Accel != "tcg" {
		a = append(a, "-global", "kvm-pit.lost_tick_policy=delay")
	}
	return a
}

func firmware(s Spec) []string {
	if s.Firmware != "uefi" && s.Firmware != "uefi-secure" {
		return nil // SeaBIOS, QEMU's default
	}
	add, vars := byFD(s.OVMFVars, s.VarsFDs, VarsFDSet, "nvram")
	return append(add,
		"-blockdev", "driver=file,node-name=ovmf-code,filename="+esc(s.OVMFCode)+",read-only=on",
		"-blockdev", "driver=file,node-name=ovmf-vars,filename="+vars,
	)
}

// byFD names a file for QEMU: through an fdset of the given descriptors
// when there are any, else by its (escaped) path.
func byFD(path string, fds []int, set int, opaque string) (add []string, name string) {
	if len(fds) == 0 {
		return nil, esc(path)
	}
	for _, fd := range fds {
		add = append(add, "-add-fd", fmt.Sprintf("fd=%d,set=%d,opaque=%s", fd, set, opaque))
	}
	return add, fmt.Sprintf("/dev/fdset/%d", set)
}

func disks(s Spec) []string {
	// cache=none keeps the guest's I/O out of the host page cache (and out
	// of the container's memory charge). Its I/O runs on QEMU's thread
	// pool, not linux-aio: with aio=native QEMU probes the kernel's AIO at
	// open with io_setup and io_destroy, and io_destroy waits out an RCU
	// grace period, 25–40 ms of every start here (docs/design.md).
	cache := map[string]string{
		"none":         "cache=none,aio=threads",
		"writeback":    "cache=writeback,aio=threads",
		"writethrough": "cache=writethrough,aio=threads",
	}[s.DiskCache]
	if cache == "" {
		cache = "cache=none,aio=threads"
	}
	diskBoot, isoBoot := 1, 2
	if s.BootFromISO {
		diskBoot, isoBoot = 2, 1
	}
	// A write that finds the storage volume full pauses the VM instead of
	// failing inside the guest (werror=enospc); the runner resumes it when
	// space returns. Other errors reach the guest as disk errors.
	a, disk := byFD(s.Disk, s.DiskFDs, DiskFDSet, "disk")
	// q35's own AHCI controller has one device per port (ide.0–ide.5):
	// each SATA device is given the next port by name, since QEMU would
	// put a second device on the first port's bus and fail.
	port := 0
	sata := func(dev string) string {
		dev += fmt.Sprintf(",bus=ide.%d", port)
		port++
		return dev
	}
	// Windows' installer has no virtio driver: the disk goes on SATA.
	diskDev := "virtio-blk-pci,drive=disk0"
	if s.Windows {
		diskDev = sata("ide-hd,drive=disk0")
	}
	a = append(a,
		"-drive", "if=none,id=disk0,format=qcow2,file="+disk+","+cache+",discard=unmap,detect-zeroes=unmap,werror=enospc,rerror=report",
		"-device", diskDev+",bootindex="+strconv.Itoa(diskBoot),
	)
	if s.ISO != "" {
		a = append(a,
			"-drive", "if=none,id=cd0,format=raw,media=cdrom,readonly=on,file="+esc(s.ISO),
			"-device", sata("ide-cd,drive=cd0")+",bootindex="+strconv.Itoa(isoBoot),
		)
	}
	if s.DriversISO != "" {
		a = append(a,
			"-drive", "if=none,id=cd1,format=raw,media=cdrom,readonly=on,file="+esc(s.DriversISO),
			"-device", sata("ide-cd,drive=cd1"),
		)
	}
	if s.Seed != "" {
		a = append(a, "-drive", "if=none,id=cidata,format=raw,readonly=on,file="+esc(s.Seed))
		if s.SeedBus == "cdrom" {
			a[len(a)-1] += ",media=cdrom"
			a = append(a, "-device", sata("ide-cd,drive=cidata"))
		} else {
			a = append(a, "-device", "virtio-blk-pci,drive=cidata")
		}
	}
	return a
}

func kernel(s Spec) []string {
	if s.Kernel == "" {
		return nil
	}
	a := []string{"-kernel", s.Kernel}
	if s.Initrd != "" {
		a = append(a, "-initrd", s.Initrd)
	}
	if s.Cmdline != "" {
		a = append(a, "-append", s.Cmdline)
	}
	return a
}

// Forward is one user-mode port forward.
type Forward struct {
	Proto       string // tcp or udp
	Host, Guest int
}

// QEMU's network backends (Spec.Net).
const (
	NetUser = "user"
	NetTAP  = "tap"
	NetNone = "none"
)

func nic(s Spec) []string {
	var netdev string
	switch s.Net {
	case NetNone:
		return nil
	case NetTAP:
		netdev = fmt.Sprintf("tap,id=net0,fd=%d", s.TAPFD)
		if s.VhostFD > 0 {
			netdev += fmt.Sprintf(",vhost=on,vhostfd=%d", s.VhostFD)
		}
	default:
		netdev = "user,id=net0"
		for _, f := range s.Forwards {
			netdev += fmt.Sprintf(",hostfwd=%s::%d-:%d", f.Proto, f.Host, f.Guest)
		}
	}
	model := "virtio-net-pci"
	if s.Windows {
		model = "e1000e" // in Windows' installer; virtio-net once its drivers are in
	}
	return []string{"-netdev", netdev, "-device", model + ",netdev=net0,mac=" + s.MAC}
}

// screen: with a console, a VGA screen on the VNC socket; with it, or
// under the Windows profile, a USB tablet (absolute pointing: the pointer
// is where the viewer's is).
func screen(s Spec) []string {
	var a []string
	if s.VNCSocket != "" {
		// force-shared: no client, view-only or not, takes the screen
		// from the others by asking for it alone.
		a = append(a, "-vnc", "unix:"+esc(s.VNCSocket)+",share=force-shared", "-device", "VGA")
	}
	if s.VNCSocket != "" || s.Windows {
		a = append(a, "-device", "qemu-xhci,id=usb", "-device", "usb-tablet,bus=usb.0")
	}
	return a
}

func monitors(s Spec) []string {
	return []string{
		// The serial console is QEMU's stdout; the runner caps the log.
		"-chardev", "stdio,id=serial0,signal=off",
		"-device", "isa-serial,chardev=serial0",
		"-chardev", "socket,id=qmp," + listen(s.QMPFD, s.QMPSocket) + ",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-chardev", "socket,id=qmp-health," + listen(s.HealthFD, s.HealthSocket) + ",server=on,wait=off",
		"-mon", "chardev=qmp-health,mode=control",
	}
}

// guestAgent is the agent's virtio-serial port on its socket.
func guestAgent(s Spec) []string {
	if s.AgentSocket == "" {
		return nil
	}
	return []string{
		"-chardev", "socket,id=qga0," + listen(s.AgentFD, s.AgentSocket) + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=virtio-serial0",
		"-device", "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
	}
}

// listen names a monitor's socket: a listening descriptor QEMU was handed,
// else a path it creates.
func listen(fd int, path string) string {
	if fd > 0 {
		return "fd=" + strconv.Itoa(fd)
	}
	return "path=" + esc(path)
}

// esc escapes a value for QEMU's key=value option syntax, where a comma
// is written twice.
func esc(v string) string { return strings.ReplaceAll(v, ",", ",,") }
