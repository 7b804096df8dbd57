package qmp

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"strings"

	"blockd/internal/qapi"
)

// Marshal encodes v as QEMU's monitor prints it (qobject/json-writer.c):
// ", " and ": " separators, non-ASCII as upper-case \uXXXX, members in
// QDict order; with pretty, QEMU's 4-space layout. json.Number values are
// printed the way QEMU prints the number it parsed (1.0 as 1, 1e2 as 100).
// The result has no line terminator.
func Marshal(v any, pretty bool) []byte {
	v = canonNumbers(v)
	if pretty {
		return qapi.MarshalPretty(v)
	}
	return qapi.Marshal(v)
}

// frame turns an encoded message into what goes on the wire: QEMU appends
// "\n" and its monitor turns every "\n" into "\r\n".
func wireFormat(b []byte) []byte {
	if bytes.IndexByte(b, '\n') >= 0 {
		b = bytes.ReplaceAll(b, []byte("\n"), []byte("\r\n"))
	}
	return append(b, '\r', '\n')
}

// canonNumbers returns v with every json.Number in a generic tree replaced
// by QEMU's rendering of it. Other values are returned unchanged.
func canonNumbers(v any) any {
	switch x := v.(type) {
	case json.Number:
		return json.Number(CanonNumber(string(x)))
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = canonNumbers(e)
		}
		return m
	case []any:
		l := make([]any, len(x))
		for i, e := range x {
			l[i] = canonNumbers(e)
		}
		return l
	}
	return v
}

// CanonNumber renders a JSON number token the way QEMU re-emits it: an
// integer that fits int64 or uint64 as such, anything else as a double
// printed with "%.17g" (json-parser.c parse_literal, json-writer.c).
func CanonNumber(s string) string {
	if !strings.ContainsAny(s, ".eE") {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return strconv.FormatInt(n, 10)
		}
		if !strings.HasPrefix(s, "-") {
			if n, err := strconv.ParseUint(s, 10, 64); err == nil {
				return strconv.FormatUint(n, 10)
			}
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil && !math.IsInf(f, 0) {
		return s // not a number token; leave it alone
	}
	return FormatDouble(f)
}

// FormatDouble is C's printf("%.17g").
func FormatDouble(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case math.IsNaN(f):
		return "nan"
	}
	return strconv.FormatFloat(f, 'g', 17, 64)
}
