package blockdimg

import (
	"context"
	"fmt"
	"io"
	"strings"

	"blockd/drivers/luks/luksfmt"
	"blockd/graph"
	"blockd/internal/keyval"
	"blockd/internal/qapi"
	"blockd/secrets"
)

// env is one invocation: its output streams, the secrets from --object and
// the graph that holds every image it opens.
type env struct {
	ctx     context.Context
	stdout  io.Writer
	stderr  io.Writer
	secrets *secrets.Store
	g       *graph.Graph
	nextID  int
}

func newEnv(ctx context.Context, stdout, stderr io.Writer) *env {
	st := &secrets.Store{}
	return &env{ctx: ctx, stdout: stdout, stderr: stderr, secrets: st, g: graph.New(st, drivers()...)}
}

func (e *env) close() { e.g.Close() }

// nodeName returns a fresh node name for an image the tool opens.
func (e *env) nodeName(prefix string) string {
	for {
		e.nextID++
		n := fmt.Sprintf("%s%d", prefix, e.nextID)
		if e.g.Lookup(n) == nil {
			return n
		}
	}
}

// warnf prints a warning as qemu-img's warn_report does.
func (e *env) warnf(format string, a ...any) {
	fmt.Fprintf(e.stderr, "%s: warning: %s\n", Prog, fmt.Sprintf(format, a...))
}

// printf writes to stdout unless quiet.
func (e *env) printf(quiet bool, format string, a ...any) {
	if !quiet {
		fmt.Fprintf(e.stdout, format, a...)
	}
}

// objectBase is the common part of --object.
type objectBase struct {
	QomType string `json:"qom-type"`
	ID      string `json:"id"`
}

// addObject implements --object for the object types an image tool needs
// (secret). Like qemu-img, a bad object ends the program.
func (e *env) addObject(arg string) error {
	tree, help, err := keyval.ParseHelp(arg, "qom-type")
	if err != nil {
		return failf("%v", err)
	}
	if help {
		fmt.Fprintln(e.stdout, "List of user creatable objects:\n  secret")
		return exitCode(0)
	}
	isKeyval := len(arg) == 0 || arg[0] != '{'
	var base objectBase
	baseOnly := map[string]any{}
	for _, k := range []string{"qom-type", "id"} {
		if v, ok := tree[k]; ok {
			baseOnly[k] = v
		}
	}
	if err := qapi.Decode(baseOnly, isKeyval, &base); err != nil {
		return failf("%v", err)
	}
	switch base.QomType {
	case "secret":
		var so secrets.Options
		if err := qapi.Decode(tree, isKeyval, &base, &so); err != nil {
			return failf("%v", err)
		}
		so.ID = base.ID
		if err := e.secrets.Add(so); err != nil {
			return failf("%v", err)
		}
		return nil
	case "secret_keyring", "tls-creds-x509", "tls-creds-psk", "tls-creds-anon", "iothread", "throttle-group",
		"authz-simple", "authz-list", "authz-listfile", "authz-pam":
		return failf("object type '%s' is not supported by %s", base.QomType, Prog)
	default:
		return failf("Parameter 'qom-type' does not accept value '%s'", base.QomType)
	}
}

// kdfLimitOpt recognises the global options --max-kdf-memory and
// --max-kdf-time at args[*i], as "--opt=value" or "--opt value" (then
// advancing *i past the value).
func kdfLimitOpt(args []string, i *int) (name, val string, ok bool) {
	a := args[*i]
	for _, n := range []string{"--max-kdf-memory", "--max-kdf-time"} {
		if v, found := strings.CutPrefix(a, n+"="); found {
			return n, v, true
		}
		if a == n {
			if *i+1 >= len(args) {
				return n, "", true
			}
			*i++
			return n, args[*i], true
		}
	}
	return "", "", false
}

// setKDFLimit applies --max-kdf-memory or --max-kdf-time to the graph every
// image opens in.
func (e *env) setKDFLimit(name, val string) error {
	l := luksfmt.KDFLimits(e.g.KDFLimits)
	set := l.SetMaxMemory
	if name == "--max-kdf-time" {
		set = l.SetMaxTime
	}
	if val == "" {
		return usagef("option '%s' requires an argument", name)
	}
	if err := set(val); err != nil {
		return usagef("%v", err)
	}
	e.g.KDFLimits = graph.KDFLimits(l)
	return nil
}
