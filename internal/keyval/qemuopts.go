package keyval

import (
	"errors"
	"fmt"
	"strings"
)

// ErrHelp is returned by ParseQemuOpts when the argument asks for help
// ("help" or "?" as a bare element). qemu-storage-daemon prints the option
// list's help and exits with status 1 in that case.
var ErrHelp = errors.New("help requested")

// QemuOpt is one name=value element of a QemuOpts argument.
type QemuOpt struct {
	Name, Value string
}

// QemuOpts is a parsed QemuOpts argument.
type QemuOpts struct {
	// ID is the value of the first "id" element, "" if there is none.
	// HasID tells an absent id from an empty one.
	ID    string
	HasID bool
	// Opts holds the other elements in order, repeats included.
	Opts []QemuOpt
	// Help is set when a bare "help" or "?" element was seen; Opts then
	// holds only the elements before it.
	Help bool
	// Warnings holds QEMU's deprecation warnings for short-form booleans,
	// each as "short-form boolean option 'x' deprecated\nPlease use x=on
	// instead".
	Warnings []string
}

// Get returns the value of the last element named name, as QEMU's
// qemu_opt_get does. It does not see "id"; use ID.
func (o *QemuOpts) Get(name string) (string, bool) {
	for i := len(o.Opts) - 1; i >= 0; i-- {
		if o.Opts[i].Name == name {
			return o.Opts[i].Value, true
		}
	}
	return "", false
}

// ParseQemuOpts parses a QemuOpts argument (--chardev) and returns the
// values by name, the last occurrence winning, and the names: "id" first
// if present, then the others in order of first appearance. The id's value
// is its first occurrence, as QEMU's qemu_opts_id. A help request returns
// ErrHelp. See ParseQemuOptsList for the syntax.
func ParseQemuOpts(s, impliedKey string) (map[string]string, []string, error) {
	o, err := ParseQemuOptsList(s, impliedKey)
	if err != nil {
		return nil, nil, err
	}
	if o.Help {
		return nil, nil, ErrHelp
	}
	values := make(map[string]string, len(o.Opts)+1)
	var order []string
	if o.HasID {
		values["id"] = o.ID
		order = append(order, "id")
	}
	for _, opt := range o.Opts {
		if _, seen := values[opt.Name]; !seen {
			order = append(order, opt.Name)
		}
		values[opt.Name] = opt.Value
	}
	return values, order, nil
}

// ParseQemuOptsList parses a QemuOpts argument the way QEMU 7.2's
// qemu_opts_parse_noisily does for an option list with named options:
//
//   - elements are separated by ','; in a value ",," stands for ',';
//   - "name=value" sets name; the name ends at the first '=' and may be
//     empty;
//   - a bare element is, when impliedKey is not "" and it is the first
//     element, the value of impliedKey (",," escaping applies, so
//     "a,,b" is the value "a,b");
//   - any other bare element is a short-form boolean: "flag" means
//     flag=on and "noflag" means flag=off (any name starting with "no" is
//     negated, whatever its type; "help" and "?" request help instead).
//     These add a deprecation warning;
//   - "id" elements are taken out of Opts; the first gives ID, which must
//     be an identifier (a letter, then letters, digits, '-', '.', '_').
//
// Names are not checked against an option list here, so QEMU's
// "Invalid parameter 'x'" and boolean value checks belong to the caller.
// The only error is QEMU's "Parameter 'id' expects an identifier".
func ParseQemuOptsList(s, impliedKey string) (*QemuOpts, error) {
	o := &QemuOpts{}
	// QEMU scans for the id first, without the implied key.
	for p := s; p != ""; {
		var name, value string
		p, name, value, _, _ = optNameValue(p, "")
		if name == "id" {
			o.ID, o.HasID = value, true
			break
		}
	}
	if o.HasID && !idWellFormed(o.ID) {
		return nil, errors.New("Parameter 'id' expects an identifier")
	}

	first := impliedKey
	for p := s; p != ""; {
		var name, value, warning string
		var help bool
		p, name, value, help, warning = optNameValue(p, first)
		if help {
			o.Help = true
			return o, nil
		}
		if warning != "" {
			o.Warnings = append(o.Warnings, warning)
		}
		first = ""
		if name == "id" {
			continue
		}
		o.Opts = append(o.Opts, QemuOpt{Name: name, Value: value})
	}
	return o, nil
}

// optValue reads a value up to the next single ',' and undoubles ",,". It
// returns the value and the rest of p, starting at that ',' if any.
func optValue(p string) (value, rest string) {
	var b strings.Builder
	for {
		i := strings.IndexByte(p, ',')
		if i < 0 {
			b.WriteString(p)
			return b.String(), ""
		}
		if i+1 < len(p) && p[i+1] == ',' {
			b.WriteString(p[:i+1])
			p = p[i+2:]
			continue
		}
		b.WriteString(p[:i])
		return b.String(), p[i:]
	}
}

// optNameValue parses one element (QEMU's get_opt_name_value) and returns
// the rest after its terminating ','.
func optNameValue(params, firstname string) (rest, name, value string, help bool, warning string) {
	n := strings.IndexAny(params, "=,")
	if n < 0 {
		n = len(params)
	}
	if n == len(params) || params[n] != '=' {
		if firstname != "" {
			name = firstname
			value, rest = optValue(params)
		} else {
			name, rest = params[:n], params[n:]
			prefix := ""
			if strings.HasPrefix(name, "no") {
				name = name[2:]
				value = "off"
				prefix = "no"
			} else {
				value = "on"
				help = name == "help" || name == "?"
			}
			if !help {
				hint := fmt.Sprintf("Please use %s=%s instead", name, value)
				if name == "delay" {
					// QEMU's special case: "nodelay" is the option's
					// real name, so "delay" means nodelay=off.
					hint = "Please use nodelay=off instead"
					if prefix != "" {
						hint = "Please use nodelay=on instead"
					}
				}
				warning = fmt.Sprintf("short-form boolean option '%s%s' deprecated\n%s", prefix, name, hint)
			}
		}
	} else {
		name = params[:n]
		value, rest = optValue(params[n+1:])
	}
	rest = strings.TrimPrefix(rest, ",")
	return rest, name, value, help, warning
}

// idWellFormed is QEMU's id_wellformed.
func idWellFormed(id string) bool {
	if id == "" || !isAlpha(id[0]) {
		return false
	}
	for i := 1; i < len(id); i++ {
		c := id[i]
		if !isAlnum(c) && c != '-' && c != '.' && c != '_' {
			return false
		}
	}
	return true
}
