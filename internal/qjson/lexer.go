package qjson

// lexer states (json-lexer.c enum json_lexer_state, minus interpolation).
type lexState uint8

const (
	inStart lexState = iota
	inRecovery
	inDQEscape
	inDQ
	inSQEscape
	inSQ
	inZero
	inExpDigits
	inExpSign
	inExpE
	inMantissa
	inMantissaDigits
	inDigits
	inSign
	inKeyword
)

type tokType uint8

const (
	tokNone tokType = iota // not a token: keep lexing
	tokLCurly
	tokRCurly
	tokLSquare
	tokRSquare
	tokColon
	tokComma
	tokInteger
	tokFloat
	tokKeyword
	tokString
	tokError
	tokOverflow // a token grew past the size limit
)

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// next is one cell of QEMU's json_lexer table: the new state or token, and
// whether c is only looked at (not consumed). A zero token with ok=false
// means JSON_ERROR, which consumes c.
func next(s lexState, c byte) (ns lexState, tok tokType, lookahead bool) {
	switch s {
	case inRecovery:
		switch {
		case c == '\t':
			return inRecovery, tokNone, false
		case c < 0x20, c >= 0xFE, c == '[', c == ']', c == '{', c == '}', c == ':', c == ',':
			return inStart, tokNone, true
		default:
			return inRecovery, tokNone, false
		}
	case inDQEscape, inSQEscape:
		if c >= 0x20 && c <= 0xFD {
			if s == inDQEscape {
				return inDQ, tokNone, false
			}
			return inSQ, tokNone, false
		}
	case inDQ, inSQ:
		quote, esc := byte('"'), inDQEscape
		if s == inSQ {
			quote, esc = '\'', inSQEscape
		}
		switch {
		case c == quote:
			return inStart, tokString, false
		case c == '\\':
			return esc, tokNone, false
		case c >= 0x20 && c <= 0xFD:
			return s, tokNone, false
		}
	case inZero:
		switch {
		case isDigit(c):
			// JSON_ERROR
		case c == '.':
			return inMantissa, tokNone, false
		default:
			return inStart, tokInteger, true
		}
	case inExpDigits:
		if isDigit(c) {
			return inExpDigits, tokNone, false
		}
		return inStart, tokFloat, true
	case inExpSign:
		if isDigit(c) {
			return inExpDigits, tokNone, false
		}
	case inExpE:
		switch {
		case c == '-', c == '+':
			return inExpSign, tokNone, false
		case isDigit(c):
			return inExpDigits, tokNone, false
		}
	case inMantissaDigits:
		switch {
		case isDigit(c):
			return inMantissaDigits, tokNone, false
		case c == 'e', c == 'E':
			return inExpE, tokNone, false
		default:
			return inStart, tokFloat, true
		}
	case inMantissa:
		if isDigit(c) {
			return inMantissaDigits, tokNone, false
		}
	case inDigits:
		switch {
		case isDigit(c):
			return inDigits, tokNone, false
		case c == 'e', c == 'E':
			return inExpE, tokNone, false
		case c == '.':
			return inMantissa, tokNone, false
		default:
			return inStart, tokInteger, true
		}
	case inSign:
		switch {
		case c == '0':
			return inZero, tokNone, false
		case c >= '1' && c <= '9':
			return inDigits, tokNone, false
		}
	case inKeyword:
		if c >= 'a' && c <= 'z' {
			return inKeyword, tokNone, false
		}
		return inStart, tokKeyword, true
	case inStart:
		switch {
		case c == '"':
			return inDQ, tokNone, false
		case c == '\'':
			return inSQ, tokNone, false
		case c == '0':
			return inZero, tokNone, false
		case c >= '1' && c <= '9':
			return inDigits, tokNone, false
		case c == '-':
			return inSign, tokNone, false
		case c == '{':
			return inStart, tokLCurly, false
		case c == '}':
			return inStart, tokRCurly, false
		case c == '[':
			return inStart, tokLSquare, false
		case c == ']':
			return inStart, tokRSquare, false
		case c == ',':
			return inStart, tokComma, false
		case c == ':':
			return inStart, tokColon, false
		case c >= 'a' && c <= 'z':
			return inKeyword, tokNone, false
		case c == ' ', c == '\t', c == '\r', c == '\n':
			return inStart, tokNone, false
		}
	}
	return inRecovery, tokError, false
}
