package daemon

import "strings"

// dataError is an error whose text had a secret's data removed; it wraps
// the original, so the QMP error class and errors.Is still work.
type dataError struct {
	msg string
	err error
}

func (e *dataError) Error() string { return e.msg }
func (e *dataError) Unwrap() error { return e.err }

// hideData removes the data member of an object (a secret's bytes) from an
// error about that object. The secrets package never puts the data in its
// errors, but the QAPI decoder quotes values and member names it rejects,
// and a client that mistakenly puts the secret there too (a format value,
// a misspelt member, a data object with members) would otherwise see it
// echoed. Every string in data of 3 bytes or more is replaced wherever it
// occurs; shorter ones where they appear quoted.
func hideData(obj map[string]any, err error) error {
	v, ok := obj["data"]
	if !ok {
		return err
	}
	var pieces []string
	collectStrings(v, &pieces)
	msg := err.Error()
	orig := msg
	for _, p := range pieces {
		switch {
		case p == "":
		case len(p) >= 3:
			msg = strings.ReplaceAll(msg, p, "<redacted>")
		default:
			msg = strings.ReplaceAll(msg, "'"+p+"'", "'<redacted>'")
		}
	}
	if msg == orig {
		return err
	}
	return &dataError{msg: msg, err: err}
}

// collectStrings appends every string in v (keys and values, recursively).
func collectStrings(v any, out *[]string) {
	switch x := v.(type) {
	case string:
		*out = append(*out, x)
	case map[string]any:
		for k, e := range x {
			*out = append(*out, k)
			collectStrings(e, out)
		}
	case []any:
		for _, e := range x {
			collectStrings(e, out)
		}
	}
}
