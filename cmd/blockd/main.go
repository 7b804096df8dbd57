// Command blockd is a block-storage daemon with qemu-storage-daemon's
// command line and QMP interface.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"

	"blockd/daemon"
	"blockd/drivers/blkdebug"
	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/nbd"
	"blockd/drivers/null"
	"blockd/drivers/qcow2"
	"blockd/drivers/raw"
	"blockd/graph"
	"blockd/internal/keyval"
	"blockd/internal/qapi"
	"blockd/qmp"
)

const usage = `Usage: blockd [options]
qemu-storage-daemon compatible block-storage daemon.

  -h, --help                 display this help and exit
  -V, --version              output version information and exit
  --demo [DIR]               run the built-in demo in DIR (default ./demo)
  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]  (or a JSON object)
                             configure a block backend
  --chardev <options>        configure a character device (socket,id=,path=
                             or host=,port=, server=on, wait=off)
  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                             configure a QMP monitor
  --qmp unix:PATH | tcp:HOST:PORT
                             shorthand for a QMP monitor on a new socket
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>]
                             start an NBD server for exports
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<text>]
                             export the specified block node over NBD
  --attach export=<name>[,device=/dev/nbdN][,read-only=on|off]
                             attach an NBD export to the local kernel as a
                             block device (like qemu-nbd --connect)
  --object <properties>      define a QOM object such as 'secret'
  --pidfile <path>           write process ID to a file after startup
  --daemonize                daemonize the process, and have the parent exit
                             once startup is complete
  --log-level <level>        panic, fatal, error, warning, info, debug, trace
  --max-kdf-memory <size>    largest argon2 memory cost of a LUKS keyslot
                             to unlock (default 1G, at most 4G)
  --max-kdf-time <duration>  longest estimated time of unlocking one LUKS
                             keyslot on this CPU (default 30s)
`

func main() {
	os.Exit(run(os.Args[1:]))
}

type opt struct{ name, arg string }

var withArg = map[string]bool{
	"blockdev": true, "chardev": true, "monitor": true, "qmp": true, "nbd-server": true,
	"export": true, "attach": true, "object": true, "pidfile": true, "log-level": true,
	"max-kdf-memory": true, "max-kdf-time": true,
}

// parseArgs splits argv into options, accepting --opt value and --opt=value.
func parseArgs(args []string) ([]opt, error) {
	var out []opt
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			// A stray argument may be the rest of a mistyped --object.
			shown, _ := redactKeyval(a)
			return nil, fmt.Errorf("Unexpected argument: %s", shown)
		}
		name := strings.TrimLeft(a, "-")
		val, hasVal := "", false
		if k, v, ok := strings.Cut(name, "="); ok {
			name, val, hasVal = k, v, true
		}
		switch name {
		case "h":
			name = "help"
		case "V":
			name = "version"
		}
		switch {
		case withArg[name]:
			if !hasVal {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("option '%s' requires an argument", a)
				}
				i++
				val = args[i]
			}
		case name == "demo":
			if !hasVal && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
				val = args[i]
			}
		case name == "help" || name == "version" || name == "daemonize":
			if hasVal {
				return nil, fmt.Errorf("option '--%s' doesn't allow an argument", name)
			}
		default:
			if hasVal { // the value may hold secret data
				return nil, fmt.Errorf("unrecognized option '--%s=...'", name)
			}
			return nil, fmt.Errorf("unrecognized option '%s'", a)
		}
		out = append(out, opt{name, val})
	}
	return out, nil
}

// Drivers returns the block drivers blockd registers.
func Drivers() []*graph.Driver {
	return []*graph.Driver{file.Driver(), raw.Driver(), null.Driver(), luks.Driver(), qcow2.Driver(), blkdebug.Driver(), nbd.Driver()}
}

func run(args []string) int {
	opts, err := parseArgs(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
		return 1
	}
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	daemonize := false
	pidfile := ""
	var kdfLimits luksfmt.KDFLimits
	for _, o := range opts {
		switch o.name {
		case "help":
			fmt.Print(usage)
			return 0
		case "version":
			v := daemon.Version.Qemu
			fmt.Printf("blockd (qemu-storage-daemon %d.%d.%d compatible)\n", v.Major, v.Minor, v.Micro)
			return 0
		case "log-level":
			lvl, err := logrus.ParseLevel(o.arg)
			if err != nil {
				fmt.Fprintf(os.Stderr, "blockd: --log-level %s: %v\n", o.arg, err)
				return 1
			}
			log.SetLevel(lvl)
		case "daemonize":
			daemonize = true
		case "pidfile":
			pidfile = o.arg
		case "max-kdf-memory", "max-kdf-time":
			set := kdfLimits.SetMaxMemory
			if o.name == "max-kdf-time" {
				set = kdfLimits.SetMaxTime
			}
			if err := set(o.arg); err != nil {
				fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
				return 1
			}
		case "demo":
			return runDemo(log, o.arg)
		}
	}
	var ready *os.File
	if daemonize {
		if os.Getenv(daemonEnv) == "" {
			return daemonizeParent(args)
		}
		ready = os.NewFile(3, "ready")
		_, _ = syscall.Setsid()
	}
	d := daemon.New(logrus.NewEntry(log), Drivers()...)
	d.Graph.KDFLimits = graph.KDFLimits(kdfLimits)
	// A signal during startup (a LUKS keyslot being unlocked for --blockdev
	// can take seconds) cancels it; afterwards it shuts the daemon down.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	var got os.Signal
	signalled := make(chan struct{})
	go func() {
		got = <-sig
		close(signalled)
		cancel()
	}()
	st := &startup{ctx: ctx, d: d, chardevs: map[string]net.Listener{}}
	for _, o := range opts {
		if err := st.apply(o); err != nil {
			if ctx.Err() != nil {
				fmt.Fprintf(os.Stderr, "blockd: received %v during startup, exiting\n", got)
				d.Close()
				return 1
			}
			arg, msg := o.arg, err.Error()
			if o.name == "object" {
				arg, msg = redactObject(arg, msg)
			}
			fmt.Fprintf(os.Stderr, "blockd: --%s %s: %s\n", o.name, arg, msg)
			d.Close()
			return 1
		}
	}
	if pidfile != "" {
		release, err := writePidfile(pidfile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "blockd: cannot create PID file: %v\n", err)
			d.Close()
			return 1
		}
		defer release()
	}
	st.serve()
	if ready != nil {
		_, _ = ready.Write([]byte{1})
		_ = ready.Close()
		if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
			_ = syscall.Dup2(int(devnull.Fd()), 0)
			_ = syscall.Dup2(int(devnull.Fd()), 1)
			_ = syscall.Dup2(int(devnull.Fd()), 2)
		}
	}
	select {
	case <-signalled:
		log.Infof("received %v, shutting down", got)
	case <-d.Done():
	}
	d.Close()
	return 0
}

const daemonEnv = "BLOCKD_DAEMONIZED"

// daemonizeParent starts the daemon as a child and exits with 0 once the
// child reports that startup completed, or 1 if it failed.
func daemonizeParent(args []string) int {
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
		return 1
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), daemonEnv+"=1")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{w}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
		return 1
	}
	_ = w.Close()
	var b [1]byte
	if n, _ := r.Read(b[:]); n == 1 {
		return 0
	}
	_ = cmd.Wait()
	return 1
}

// writePidfile writes the PID under an exclusive lock, as QEMU does, and
// returns a function that unlinks it.
func writePidfile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: another instance holds the PID file", path)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.WriteString(strconv.Itoa(os.Getpid()) + "\n"); err != nil {
		f.Close()
		return nil, err
	}
	return func() { os.Remove(path); f.Close() }, nil
}

// startup applies options in order.
type startup struct {
	ctx      context.Context // cancelled by a signal
	d        *daemon.Daemon
	chardevs map[string]net.Listener
	monitors []monitor
}

type monitor struct {
	l      net.Listener
	pretty bool
}

func isJSON(s string) bool { return strings.HasPrefix(strings.TrimLeft(s, " \t\n"), "{") }

func (st *startup) apply(o opt) error {
	ctx := st.ctx
	switch o.name {
	case "blockdev":
		tree, err := keyval.Parse(o.arg, "driver")
		if err != nil {
			return err
		}
		return st.d.AddBlockdev(ctx, tree, !isJSON(o.arg))
	case "object":
		tree, err := keyval.Parse(o.arg, "qom-type")
		if err != nil {
			return err
		}
		return st.d.AddObject(tree, !isJSON(o.arg))
	case "chardev":
		return st.chardev(o.arg)
	case "monitor":
		return st.monitor(o.arg)
	case "qmp":
		return st.qmpShorthand(o.arg)
	case "nbd-server":
		tree, err := keyval.Parse(o.arg, "")
		if err != nil {
			return err
		}
		return st.d.StartNBDFlat(tree, !isJSON(o.arg))
	case "export":
		tree, err := keyval.Parse(o.arg, "type")
		if err != nil {
			return err
		}
		return st.d.AddExport(ctx, tree, !isJSON(o.arg))
	case "attach":
		tree, err := keyval.Parse(o.arg, "export")
		if err != nil {
			return err
		}
		var a struct {
			Export   string `json:"export"`
			Device   string `json:"device,omitempty"`
			ReadOnly bool   `json:"read-only,omitempty"`
		}
		if err := decodeKeyval(tree, !isJSON(o.arg), &a); err != nil {
			return err
		}
		path, err := st.d.AttachLocal(ctx, a.Export, a.Device, a.ReadOnly)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "blockd: export '%s' attached as %s\n", a.Export, path)
	}
	return nil
}

func (st *startup) chardev(arg string) error {
	kv, _, err := keyval.ParseQemuOpts(arg, "backend")
	if err != nil {
		return err
	}
	backend, id := kv["backend"], kv["id"]
	if backend == "" {
		return errors.New(`chardev: "backend" not specified`)
	}
	if id == "" {
		return errors.New(`Parameter 'id' is missing`)
	}
	if _, dup := st.chardevs[id]; dup {
		return fmt.Errorf("attempt to add duplicate property '%s' to object (type 'container')", id)
	}
	if backend != "socket" {
		return fmt.Errorf("'%s' is not a valid char driver name", backend)
	}
	if kv["server"] != "on" && kv["server"] != "" {
		return errors.New("blockd only supports server sockets for monitors (server=on)")
	}
	var l net.Listener
	switch {
	case kv["path"] != "":
		l, err = qmp.ListenUnix(kv["path"])
	case kv["port"] != "":
		l, err = chardevInet(kv)
	default:
		return errors.New("chardev: socket: no host given")
	}
	if err != nil {
		return err
	}
	st.chardevs[id] = l
	return nil
}

func (st *startup) monitor(arg string) error {
	tree, err := keyval.Parse(arg, "chardev")
	if err != nil {
		return err
	}
	var m struct {
		Chardev string `json:"chardev"`
		Mode    string `json:"mode,omitempty"`
		Pretty  bool   `json:"pretty,omitempty"`
		ID      string `json:"id,omitempty"`
	}
	if err := decodeKeyval(tree, !isJSON(arg), &m); err != nil {
		return err
	}
	if m.Mode != "" && m.Mode != "control" {
		return errors.New("Only QMP is supported")
	}
	l, ok := st.chardevs[m.Chardev]
	if !ok {
		return fmt.Errorf("chardev \"%s\" not found", m.Chardev)
	}
	delete(st.chardevs, m.Chardev)
	st.monitors = append(st.monitors, monitor{l: l, pretty: m.Pretty})
	return nil
}

func (st *startup) qmpShorthand(arg string) error {
	var l net.Listener
	var err error
	switch {
	case strings.HasPrefix(arg, "unix:"):
		path, _, _ := strings.Cut(strings.TrimPrefix(arg, "unix:"), ",")
		l, err = qmp.ListenUnix(path)
	case strings.HasPrefix(arg, "tcp:"):
		addr, _, _ := strings.Cut(strings.TrimPrefix(arg, "tcp:"), ",")
		l, err = qmp.ListenTCP(addr)
	default:
		return errors.New("expected unix:PATH or tcp:HOST:PORT")
	}
	if err != nil {
		return err
	}
	st.monitors = append(st.monitors, monitor{l: l})
	return nil
}

// serve starts the monitors once every option has been applied.
func (st *startup) serve() {
	for _, m := range st.monitors {
		go func(m monitor) { _ = st.d.QMP.Serve(m.l, qmp.Pretty(m.pretty)) }(m)
	}
}

func decodeKeyval(tree any, keyval bool, dst any) error {
	return qapi.Decode(tree, keyval, dst)
}
