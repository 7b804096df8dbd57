// Package daemon is blockd's storage daemon: it owns the block graph, the
// secret and TLS objects, the jobs and the NBD server, and exposes them as
// QMP commands. cmd/blockd builds one from the command line.
//
// One file per command group: nodes.go (blockdev-add, blockdev-del,
// query-named-block-nodes, query-block, block_resize), objects.go
// (object-add, object-del; secrets), tls.go (tls-creds-x509 objects),
// exports.go (nbd-server-start/-stop/-add/-remove, block-export-add/-del,
// query-block-exports), sockaddr.go (QEMU's SocketAddress), jobs.go
// (blockdev-create, x-blockdev-amend; the job-* commands are in
// daemon/job), attach.go (local /dev/nbdN attach), redact.go (secrets kept
// out of error texts).
package daemon

import (
	"sync"

	"github.com/sirupsen/logrus"

	"blockd/daemon/job"
	"blockd/graph"
	"blockd/nbd/attach"
	"blockd/qmp"
	"blockd/secrets"
)

// Version is what blockd reports in the QMP greeting and query-version: the
// QEMU release whose interface it implements.
var Version = qmp.Version{Qemu: qmp.VersionTriple{Major: 7, Minor: 2, Micro: 0}, Package: "blockd"}

// Daemon is a running blockd.
type Daemon struct {
	Log     *logrus.Entry
	Graph   *graph.Graph
	Secrets *secrets.Store
	QMP     *qmp.Server
	Jobs    *job.Manager

	// mu protects objects, tls and nbd.
	mu       sync.Mutex
	objects  map[string]string // id -> qom-type, one namespace as in QOM
	tls      map[string]*tlsObject
	nbd      *nbdState
	attached []*attach.Device // local /dev/nbdN attachments

	quitOnce sync.Once
	quit     chan struct{}
}

// New makes a daemon whose graph knows the given drivers.
func New(log *logrus.Entry, drivers ...*graph.Driver) *Daemon {
	st := &secrets.Store{}
	d := &Daemon{
		Log:     log,
		Secrets: st,
		Graph:   graph.New(st, drivers...),
		QMP:     qmp.NewServer(log.WithField("component", "qmp"), Version),
		objects: map[string]string{},
		tls:     map[string]*tlsObject{},
		quit:    make(chan struct{}),
	}
	d.Jobs = job.NewManager(d.QMP.Emit)
	job.RegisterQMP(d.QMP, d.Jobs)
	d.registerJobs()
	d.registerBlockJobs()
	d.QMP.SetQuit(d.Quit)
	d.Graph.Events = d.QMP.Emit
	d.Graph.TLSCreds = tlsStore{d}
	d.registerBlock()
	d.registerSnapshot()
	d.registerStream()
	d.registerCommit()
	d.registerMirror()
	d.registerWriteThreshold()
	d.registerObjects()
	d.registerNBD()
	return d
}

// Quit asks the daemon to shut down (the quit command, signals).
func (d *Daemon) Quit() { d.quitOnce.Do(func() { close(d.quit) }) }

// Done is closed when the daemon has been asked to quit.
func (d *Daemon) Done() <-chan struct{} { return d.quit }

// Close shuts everything down: monitors, exports, nodes.
func (d *Daemon) Close() {
	_ = d.QMP.Close()
	d.Jobs.Close()
	d.mu.Lock()
	if d.nbd != nil {
		_ = d.stopNBD()
	}
	d.mu.Unlock()
	d.Graph.Close()
}
