package main

import (
	"encoding/json"
	"strings"
)

// redacted replaces secret data in what blockd prints about a failing
// option.
const redacted = "<redacted>"

// objectKeys are the properties of the objects --object creates (secret,
// tls-creds-x509) other than data: a keyval part that starts with one of
// them ends a secret's data.
var objectKeys = map[string]bool{
	"qom-type": true, "id": true, "file": true, "format": true, "keyid": true, "iv": true, "loaded": true,
	"dir": true, "endpoint": true, "verify-peer": true, "priority": true, "sanity-check": true,
}

// redactObject returns an --object argument and the error text to print
// for it with the secret data removed. QEMU prints the whole argument with
// the error (error_report with the option as location); blockd keeps the
// argument but never the value of a data member, nor any piece of it that
// the error quotes (keyval splits a data value that holds a single comma
// into a parameter name, which the error then names).
func redactObject(arg, msg string) (string, string) {
	var out string
	var secret []string
	if strings.HasPrefix(strings.TrimLeft(arg, " \t\n"), "{") {
		out, secret = redactJSON(arg)
	} else {
		out, secret = redactKeyval(arg)
	}
	return out, scrub(msg, secret)
}

// redactKeyval handles the keyval form: "data=" starts the secret, which
// runs up to the next part that names a known property ("," inside a value
// is written ",,", so a single comma in a secret starts a new part).
func redactKeyval(arg string) (string, []string) {
	parts := splitKeyval(arg)
	var out, secret []string
	inData := false
	for _, p := range parts {
		key, val, hasEq := strings.Cut(p, "=")
		switch {
		case hasEq && key == "data":
			inData = true
			secret = append(secret, val, strings.ReplaceAll(val, ",,", ","))
			out = append(out, "data="+redacted)
		case inData && !(hasEq && objectKeys[key]):
			secret = append(secret, p, strings.ReplaceAll(p, ",,", ","))
		default:
			inData = false
			out = append(out, p)
		}
	}
	return strings.Join(out, ","), secret
}

// splitKeyval splits at single commas; ",," stays inside a part.
func splitKeyval(s string) []string {
	var parts []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] != ',' {
			continue
		}
		if i+1 < len(s) && s[i+1] == ',' {
			i++
			continue
		}
		parts = append(parts, s[start:i])
		start = i + 1
	}
	return append(parts, s[start:])
}

// redactJSON handles the JSON form. A well-formed object gets its data
// member replaced; from a malformed one everything after the first
// mention of data is withheld, since where the value ends is unknown.
func redactJSON(arg string) (string, []string) {
	var obj map[string]any
	if err := json.Unmarshal([]byte(arg), &obj); err == nil {
		v, ok := obj["data"]
		if !ok {
			return arg, nil
		}
		var secret []string
		if s, ok := v.(string); ok {
			secret = append(secret, s)
			if j, err := json.Marshal(s); err == nil {
				secret = append(secret, strings.Trim(string(j), `"`))
			}
		} else if j, err := json.Marshal(v); err == nil {
			secret = append(secret, string(j))
		}
		obj["data"] = redacted
		var out strings.Builder
		enc := json.NewEncoder(&out)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(obj); err != nil {
			return "{...}", secret
		}
		return strings.TrimSuffix(out.String(), "\n"), secret
	}
	i := strings.Index(arg, `"data"`)
	if i < 0 {
		return arg, nil
	}
	return arg[:i] + `"data": ` + redacted + "}", []string{arg[i+len(`"data"`):]}
}

// scrub removes secret text from an error message: every occurrence of a
// secret piece of 3 bytes or more, and every quoted token ('...') that is
// part of a secret piece, whatever its length.
func scrub(msg string, secret []string) string {
	for _, s := range secret {
		if len(s) >= 3 {
			msg = strings.ReplaceAll(msg, s, redacted)
		}
	}
	var b strings.Builder
	for {
		i := strings.IndexByte(msg, '\'')
		if i < 0 {
			break
		}
		j := strings.IndexByte(msg[i+1:], '\'')
		if j < 0 {
			break
		}
		tok := msg[i+1 : i+1+j]
		b.WriteString(msg[:i+1])
		if tok != "" && tok != redacted && inAny(tok, secret) {
			b.WriteString(redacted)
		} else {
			b.WriteString(tok)
		}
		b.WriteByte('\'')
		msg = msg[i+2+j:]
	}
	b.WriteString(msg)
	return b.String()
}

func inAny(tok string, secret []string) bool {
	for _, s := range secret {
		if strings.Contains(s, tok) {
			return true
		}
	}
	return false
}
