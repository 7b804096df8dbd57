// Package daemon is blockd's storage daemon: it owns the block graph, the
// secret and TLS objects, the jobs and the NBD server, and exposes them as
// QMP commands. cmd/blockd builds one from the command line.
package daemon

import (
	"context"
	"fmt"
	"sync"

	"github.com/sirupsen/logrus"

	"blockd/graph"
	"blockd/internal/job"
	"blockd/internal/qapi"
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
	d.QMP.SetQuit(d.Quit)
	d.Graph.Events = d.QMP.Emit
	d.registerBlock()
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

type nodeNameArgs struct {
	NodeName string `json:"node-name"`
}

type queryNodesArgs struct {
	Flat *bool `json:"flat,omitempty"`
}

// AddBlockdev implements --blockdev and blockdev-add.
func (d *Daemon) AddBlockdev(ctx context.Context, tree any, keyval bool) error {
	_, err := d.Graph.Add(ctx, tree, keyval)
	return err
}

func (d *Daemon) registerBlock() {
	qmp.Handle(d.QMP, "blockdev-add", func(ctx context.Context, m *qmp.Monitor, a *qmp.Args) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.AddBlockdev(ctx, map[string]any(*a), false)
	})
	qmp.Handle(d.QMP, "blockdev-del", func(ctx context.Context, m *qmp.Monitor, a *nodeNameArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.Graph.Del(a.NodeName)
	})
	qmp.Handle(d.QMP, "query-named-block-nodes", func(ctx context.Context, m *qmp.Monitor, a *queryNodesArgs) ([]graph.BlockDeviceInfo, error) {
		return d.Graph.QueryNamedBlockNodes(a.Flat != nil && *a.Flat), nil
	})
	qmp.Handle(d.QMP, "query-block", func(ctx context.Context, m *qmp.Monitor, a *qmp.Empty) ([]struct{}, error) {
		// qemu-storage-daemon has no named BlockBackends.
		return []struct{}{}, nil
	})
	qmp.Handle(d.QMP, "block_resize", d.blockResize)
}

type blockResizeArgs struct {
	Device   *string `json:"device,omitempty"`
	NodeName *string `json:"node-name,omitempty"`
	Size     int64   `json:"size"`
}

func (d *Daemon) blockResize(ctx context.Context, m *qmp.Monitor, a *blockResizeArgs) (*qmp.Empty, error) {
	dev, name := "", ""
	if a.Device != nil {
		dev = *a.Device
	}
	if a.NodeName != nil {
		name = *a.NodeName
	}
	lookup := name
	if lookup == "" {
		lookup = dev
	}
	b := d.Graph.Lookup(lookup)
	if b == nil || (dev != "" && name != "") {
		return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", dev, name)
	}
	if a.Size < 0 {
		return nil, fmt.Errorf("Parameter 'size' expects a >0 size")
	}
	c, err := d.Graph.NewBackend(b.Name(), "", graph.PermResize, graph.PermAll)
	if err != nil {
		return nil, err
	}
	defer d.Graph.ReleaseBackend(c)
	if err := c.Truncate(ctx, a.Size, graph.PreallocOff); err != nil {
		return nil, resizeError(err)
	}
	return &qmp.Empty{}, nil
}

func resizeError(err error) error {
	var oe *graph.OpError
	if e, ok := err.(*graph.OpError); ok {
		oe = e
		return fmt.Errorf("%v", oe.Err)
	}
	return err
}

// objectBase is the base of ObjectOptions.
type objectBase struct {
	QomType objectType `json:"qom-type"`
	ID      string     `json:"id"`
}

type objectType string

func (objectType) EnumValues() []string { return objectTypes }

// objectTypes lists the qom-types blockd implements.
var objectTypes = []string{"secret", "tls-creds-x509"}

// AddObject implements --object and object-add. Its errors never contain
// a secret's data (see hideData).
func (d *Daemon) AddObject(tree any, keyval bool) error {
	err := d.addObject(tree, keyval)
	if obj, ok := tree.(map[string]any); ok && err != nil {
		return hideData(obj, err)
	}
	return err
}

func (d *Daemon) addObject(tree any, keyval bool) error {
	obj, ok := tree.(map[string]any)
	if !ok {
		return fmt.Errorf("Invalid parameter type for 'null', expected: object")
	}
	var base objectBase
	dec := &qapi.Decoder{Keyval: keyval}
	// Decode the base first so that its errors come first, as the QAPI
	// visitor reports them.
	baseOnly := map[string]any{}
	for _, k := range []string{"qom-type", "id"} {
		if v, ok := obj[k]; ok {
			baseOnly[k] = v
		}
	}
	if err := dec.Decode(baseOnly, "", &base); err != nil {
		return err
	}
	if !validID(base.ID) {
		return fmt.Errorf("Parameter 'id' expects an identifier")
	}
	switch base.QomType {
	case "secret":
		var so secrets.Options
		if err := dec.Decode(obj, "", &base, &so); err != nil {
			return err
		}
		so.ID = base.ID
		d.mu.Lock()
		defer d.mu.Unlock()
		if _, dup := d.objects[base.ID]; dup {
			return fmt.Errorf("attempt to add duplicate property '%s' to object (type 'container')", base.ID)
		}
		if err := d.Secrets.Add(so); err != nil {
			return err
		}
		d.objects[base.ID] = string(base.QomType)
		return nil
	case "tls-creds-x509":
		var p tlsX509Props
		if err := dec.Decode(obj, "", &base, &p); err != nil {
			return err
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if _, dup := d.objects[base.ID]; dup {
			return fmt.Errorf("attempt to add duplicate property '%s' to object (type 'container')", base.ID)
		}
		o, err := d.addTLSX509(base.ID, p)
		if err != nil {
			return err
		}
		d.tls[base.ID] = o
		d.objects[base.ID] = string(base.QomType)
		return nil
	}
	return fmt.Errorf("Parameter 'qom-type' does not accept value '%s'", base.QomType)
}

// validID is QEMU's id_wellformed: a letter, then letters, digits, '-',
// '.', '_'.
func validID(s string) bool {
	if s == "" {
		return false
	}
	c := s[0]
	if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

type objectDelArgs struct {
	ID string `json:"id"`
}

// DelObject implements object-del.
func (d *Daemon) DelObject(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	typ, ok := d.objects[id]
	if !ok {
		return fmt.Errorf("object '%s' not found", id)
	}
	switch typ {
	case "secret":
		if err := d.Secrets.Delete(id); err != nil {
			return err
		}
	case "tls-creds-x509":
		// A server already started keeps its configuration, as in QEMU.
		delete(d.tls, id)
	}
	delete(d.objects, id)
	return nil
}

func (d *Daemon) registerObjects() {
	qmp.Handle(d.QMP, "object-add", func(ctx context.Context, m *qmp.Monitor, a *qmp.Args) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.AddObject(map[string]any(*a), false)
	})
	qmp.Handle(d.QMP, "object-del", func(ctx context.Context, m *qmp.Monitor, a *objectDelArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.DelObject(a.ID)
	})
}
