package daemon

import (
	"context"
	"fmt"

	"blockd/internal/qapi"
	"blockd/qmp"
	"blockd/secrets"
)

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
	if !qapi.WellFormedID(base.ID) {
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
