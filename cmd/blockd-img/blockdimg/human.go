package blockdimg

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
)

// sizeToStr is QEMU's size_to_str: a size with an IEC binary prefix and
// three significant digits ("10 MiB", "2.5 KiB", "0.977 KiB").
func sizeToStr(v uint64) string {
	_, e := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (e - 1) / 10 * 10
	if i < 0 {
		i = 0
	}
	prefixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	return fmt.Sprintf("%0.3g %sB", float64(v)/float64(uint64(1)<<uint(i)), prefixes[i/10])
}

// orderedValue is a JSON value with object members in their text order.
type orderedValue struct {
	kind    byte // 'o' object, 'a' array, 's' string, 'n' number, 'b' bool, 'z' null
	members []orderedMember
	items   []orderedValue
	scalar  string
}

type orderedMember struct {
	name  string
	value orderedValue
}

// parseOrdered parses JSON keeping the member order (qapi.Marshal emits
// QEMU's QDict order, which the human dump must follow).
func parseOrdered(b []byte) (orderedValue, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	return parseOrderedValue(d)
}

func parseOrderedValue(d *json.Decoder) (orderedValue, error) {
	t, err := d.Token()
	if err != nil {
		return orderedValue{}, err
	}
	switch x := t.(type) {
	case json.Delim:
		switch x {
		case '{':
			v := orderedValue{kind: 'o'}
			for d.More() {
				kt, err := d.Token()
				if err != nil {
					return v, err
				}
				mv, err := parseOrderedValue(d)
				if err != nil {
					return v, err
				}
				v.members = append(v.members, orderedMember{kt.(string), mv})
			}
			_, err := d.Token()
			return v, err
		case '[':
			v := orderedValue{kind: 'a'}
			for d.More() {
				iv, err := parseOrderedValue(d)
				if err != nil {
					return v, err
				}
				v.items = append(v.items, iv)
			}
			_, err := d.Token()
			return v, err
		}
	case string:
		return orderedValue{kind: 's', scalar: x}, nil
	case json.Number:
		return orderedValue{kind: 'n', scalar: x.String()}, nil
	case bool:
		if x {
			return orderedValue{kind: 'b', scalar: "true"}, nil
		}
		return orderedValue{kind: 'b', scalar: "false"}, nil
	case nil:
		return orderedValue{kind: 'z', scalar: "null"}, nil
	}
	return orderedValue{}, fmt.Errorf("unexpected JSON token %v", t)
}

// dumpQObject prints a value the way QEMU's block/qapi.c dump_qobject
// does for "Format specific information".
func dumpQObject(w io.Writer, indent int, v orderedValue) {
	switch v.kind {
	case 'o':
		for _, m := range v.members {
			composite := m.value.kind == 'o' || m.value.kind == 'a'
			sep := " "
			if composite {
				sep = "\n"
			}
			fmt.Fprintf(w, "%*s%s:%s", indent*4, "", strings.ReplaceAll(m.name, "-", " "), sep)
			dumpQObject(w, indent+1, m.value)
			if !composite {
				fmt.Fprintln(w)
			}
		}
	case 'a':
		for i, it := range v.items {
			composite := it.kind == 'o' || it.kind == 'a'
			sep := " "
			if composite {
				sep = "\n"
			}
			fmt.Fprintf(w, "%*s[%d]:%s", indent*4, "", i, sep)
			dumpQObject(w, indent+1, it)
			if !composite {
				fmt.Fprintln(w)
			}
		}
	default:
		fmt.Fprint(w, v.scalar)
	}
}
