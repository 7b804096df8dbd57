package keyval

import (
	"errors"
	"strings"

	"blockd/internal/qjson"
)

// parseJSON parses s, which starts with '{', as one JSON object the way
// QEMU 7.2's qobject_from_json does (internal/qjson), so that results and
// error texts match. Strings are held in modified UTF-8, as QEMU holds
// them: "\u0000" becomes C0 80. Error texts carry stray bytes as QEMU
// prints them on the command line.
func parseJSON(s string) (map[string]any, error) {
	// QEMU sees a C string.
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	v, err := qjson.Parse(s, qjson.Options{ModifiedUTF8: true})
	if err != nil {
		return nil, err
	}
	m, ok := v.(map[string]any)
	if !ok {
		// Unreachable while callers check for a leading '{'.
		return nil, errors.New("JSON value is not an object")
	}
	return m, nil
}
