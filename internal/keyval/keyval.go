// Package keyval parses the command-line option syntaxes of
// qemu-storage-daemon 7.2:
//
//   - keyval (QEMU util/keyval.c), used by --blockdev, --export, --monitor,
//     --nbd-server and --object: "k=v,a.b=c,list.0=x", or a JSON object when
//     the argument starts with '{';
//   - QemuOpts (QEMU util/qemu-option.c), used by --chardev: flat "k=v"
//     pairs with short-form booleans.
//
// Error texts are QEMU's.
//
// # Keyval grammar
//
//	key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//	key-val      = key '=' val | help
//	key          = key-fragment { '.' key-fragment }
//	key-fragment = qapi-name | index
//	qapi-name    = '__' / [a-z0-9.-]+ / '_' / [A-Za-z][A-Za-z0-9_-]* /
//	index        = / [0-9]+ /
//	val          = { / [^,]+ / | ',,' }
//	help         = 'help' | '?'
//
// With an implied key the first key-val may be a bare value (no '=' and no
// ',') that is assigned to the implied key. The first fragment of a key must
// be a QAPI name; later fragments may be indexes. Dotted keys nest objects;
// an object whose members are all indexes becomes a list, whose indexes must
// not have gaps. When several key-vals name the same leaf, the last one wins.
// Leaves are strings; there is no way to write numbers, booleans, null, or an
// empty object or list.
//
// # JSON
//
// JSON arguments are parsed by a port of QEMU's own JSON parser (see
// json.go), so single-quoted strings, modified UTF-8 ("\u0000" is C0 80),
// duplicate-key errors and QEMU's error texts all carry over.
package keyval

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// maxFragment is the exclusive bound on a key fragment's length.
const maxFragment = 128

// errHelpUnavailable is QEMU's error for a help request where no help is
// offered (--blockdev help, --export help...).
var errHelpUnavailable = errors.New("Help is not available for this option")

// Parse parses a keyval or JSON option argument as qemu-storage-daemon does
// for --blockdev, --export, --monitor and --nbd-server. impliedKey names the
// key a leading bare value is assigned to ("" for none).
//
// Keyval input yields a tree of map[string]any, []any and string. Input that
// starts with '{' is parsed as one JSON object: strings, json.Number (the
// number's text), bool, nil, []any and map[string]any. A help request
// ("help" or "?") is an error, as in QEMU.
func Parse(s, impliedKey string) (map[string]any, error) {
	m, help, err := parse(s, impliedKey)
	if err != nil {
		return nil, err
	}
	if help {
		return nil, errHelpUnavailable
	}
	return m, nil
}

// ParseHelp is Parse for options that offer help, such as --object: a
// "help" or "?" element is not an error but sets help, and the other
// elements are returned as usual so that context-specific help can be
// printed. JSON input never requests help.
func ParseHelp(s, impliedKey string) (m map[string]any, help bool, err error) {
	return parse(s, impliedKey)
}

func parse(s, impliedKey string) (map[string]any, bool, error) {
	if strings.HasPrefix(s, "{") {
		m, err := parseJSON(s)
		return m, false, err
	}
	root := newDict()
	help := false
	implied := impliedKey
	for rest := s; rest != ""; {
		var err error
		rest, err = parseOne(root, rest, implied, &help)
		if err != nil {
			return nil, false, err
		}
		implied = ""
	}
	v, err := listify(root, nil)
	if err != nil {
		return nil, false, err
	}
	// The root's members are QAPI names, never indexes, so it stays a map.
	return v.(map[string]any), help, nil
}

// dict is an object under construction. It remembers insertion order so
// that results and error choices are deterministic.
type dict struct {
	keys []string
	vals map[string]any // string or *dict
}

func newDict() *dict { return &dict{vals: make(map[string]any)} }

// put maps k in d to value (a string), or to a dict when value is nil,
// keeping an existing dict and replacing an existing string. prefix is the
// key up to k's parent, for the error message. It returns the mapped value.
func (d *dict) put(k string, value *string, prefix string) (any, error) {
	old, ok := d.vals[k]
	if ok {
		_, oldIsString := old.(string)
		if oldIsString != (value != nil) {
			return nil, fmt.Errorf("Parameters '%s.*' used inconsistently", prefix)
		}
		if value == nil {
			return old, nil
		}
		d.vals[k] = *value
		return *value, nil
	}
	d.keys = append(d.keys, k)
	if value == nil {
		nd := newDict()
		d.vals[k] = nd
		return nd, nil
	}
	d.vals[k] = *value
	return *value, nil
}

// helpPrefixLen is QEMU's starts_with_help_option: the length of a leading
// "?" or "help", or 0.
func helpPrefixLen(s string) int {
	switch {
	case strings.HasPrefix(s, "?"):
		return 1
	case strings.HasPrefix(s, "help"):
		return 4
	}
	return 0
}

func isAlpha(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool { return c >= '0' && c <= '9' }
func isAlnum(c byte) bool { return isAlpha(c) || isDigit(c) }

// qapiNameLen returns the length of the QAPI name at the start of s (QEMU's
// parse_qapi_name with complete=false), or 0 if there is none.
func qapiNameLen(s string) int {
	p := 0
	if p < len(s) && s[p] == '_' { // downstream __RFQDN_ prefix
		p++
		if p >= len(s) || s[p] != '_' {
			return 0
		}
		p++
		for p < len(s) && (isAlnum(s[p]) || s[p] == '-' || s[p] == '.') {
			p++
		}
		if p >= len(s) || s[p] != '_' {
			return 0
		}
		p++
	}
	if p >= len(s) || !isAlpha(s[p]) {
		return 0
	}
	p++
	for p < len(s) && (isAlnum(s[p]) || s[p] == '-' || s[p] == '_') {
		p++
	}
	return p
}

// digitsLen returns the number of leading decimal digits of s.
func digitsLen(s string) int {
	n := 0
	for n < len(s) && isDigit(s[n]) {
		n++
	}
	return n
}

// keyIndex converts an all-digit key to a list index, capped at
// math.MaxInt32 as QEMU's key_to_index caps at INT_MAX. ok is false if key
// is not all digits.
func keyIndex(key string) (int, bool) {
	if key == "" || digitsLen(key) != len(key) {
		return 0, false
	}
	n := 0
	for i := 0; i < len(key); i++ {
		n = n*10 + int(key[i]-'0')
		if n > math.MaxInt32 {
			return math.MaxInt32, true
		}
	}
	return n, true
}

// parseOne parses the key-val at the start of params into root and returns
// the rest of params after it and its terminating comma.
func parseOne(root *dict, params, implied string, help *bool) (string, error) {
	key := params
	keyEnd := strings.IndexAny(params, "=,")
	if keyEnd < 0 {
		keyEnd = len(params)
	}
	valEnd := -1
	if keyEnd > 0 && (keyEnd == len(params) || params[keyEnd] != '=') {
		if helpPrefixLen(params) == keyEnd {
			*help = true
			rest := params[keyEnd:]
			return strings.TrimPrefix(rest, ","), nil
		}
		if implied != "" {
			// Desugar the bare value into implied=value.
			key = implied
			valEnd = keyEnd
			keyEnd = len(implied)
		}
	}

	// Walk the key fragments; cur is the dict the current fragment
	// applies to and inCur the previous fragment.
	cur := root
	inCur := ""
	s := 0
	for {
		var n int
		if s != 0 && s < keyEnd && isDigit(key[s]) {
			n = digitsLen(key[s:keyEnd])
		} else {
			n = qapiNameLen(key[s:keyEnd])
		}
		if n == 0 || (s+n < keyEnd && key[s+n] != '.') {
			return "", fmt.Errorf("Invalid parameter '%s'", key[:keyEnd])
		}
		if n >= maxFragment {
			what := ""
			if s != 0 || s+n != keyEnd {
				what = " fragment"
			}
			return "", fmt.Errorf("Parameter%s '%s' is too long", what, key[s:s+n])
		}
		if s != 0 {
			next, err := cur.put(inCur, nil, key[:s-1])
			if err != nil {
				return "", err
			}
			cur = next.(*dict)
		}
		inCur = key[s : s+n]
		s += n
		if s == keyEnd {
			break
		}
		s++ // skip '.'
	}

	var val string
	var rest string
	if valEnd >= 0 {
		val = params[:valEnd]
		rest = strings.TrimPrefix(params[valEnd:], ",")
	} else {
		if keyEnd == len(params) || params[keyEnd] != '=' {
			return "", fmt.Errorf("Expected '=' after parameter '%s'", key[:keyEnd])
		}
		var b strings.Builder
		i := keyEnd + 1
		for i < len(params) {
			if params[i] == ',' {
				i++
				if i == len(params) || params[i] != ',' {
					break
				}
			}
			b.WriteByte(params[i])
			i++
		}
		val = b.String()
		rest = params[i:]
	}
	if _, err := cur.put(inCur, &val, key[:keyEnd]); err != nil {
		return "", err
	}
	return rest, nil
}

// keyPath is the chain of key fragments leading to a dict, innermost first.
type keyPath struct {
	frag   string
	parent *keyPath
}

// String joins the fragments from the root, each followed by '.'.
func (p *keyPath) String() string {
	var frags []string
	for ; p != nil; p = p.parent {
		frags = append(frags, p.frag)
	}
	var b strings.Builder
	for i := len(frags) - 1; i >= 0; i-- {
		b.WriteString(frags[i])
		b.WriteByte('.')
	}
	return b.String()
}

// listify converts d to a map[string]any, or to a []any when all its keys
// are indexes, recursively. path leads to d.
func listify(d *dict, path *keyPath) (any, error) {
	hasIndex, hasMember := false, false
	for _, k := range d.keys {
		if _, ok := keyIndex(k); ok {
			hasIndex = true
		} else {
			hasMember = true
		}
		if sub, ok := d.vals[k].(*dict); ok {
			v, err := listify(sub, &keyPath{frag: k, parent: path})
			if err != nil {
				return nil, err
			}
			d.vals[k] = v
		}
	}
	if hasIndex && hasMember {
		return nil, fmt.Errorf("Parameters '%s*' used inconsistently", path.String())
	}
	if !hasIndex {
		m := make(map[string]any, len(d.keys))
		for _, k := range d.keys {
			m[k] = d.vals[k]
		}
		return m, nil
	}

	// As in QEMU: one slot per key plus a nil sentinel, so an index beyond
	// the number of keys shows up as a missing element. Of keys that map
	// to the same index ("1" and "01"), the one that first appeared later
	// wins (QEMU's choice depends on its hash table order).
	nelt := len(d.keys) + 1
	elt := make([]any, nelt)
	maxIndex := -1
	for _, k := range d.keys {
		i, _ := keyIndex(k)
		maxIndex = max(maxIndex, i)
		if i >= nelt-1 {
			continue
		}
		elt[i] = d.vals[k]
	}
	n := min(nelt, maxIndex+1)
	for i := 0; i < n; i++ {
		if elt[i] == nil {
			return nil, fmt.Errorf("Parameter '%s%s' missing", path.String(), strconv.Itoa(i))
		}
	}
	return elt[:n:n], nil
}
