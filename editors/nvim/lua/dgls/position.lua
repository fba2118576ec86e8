--- dgls.position: byte columns (what Neovim uses) <-> LSP characters in the client's position encoding.
--- Knows nothing about requests; works on Neovim 0.10 through 0.12.

local M = {}

local has_011 = vim.fn.has('nvim-0.11') == 1

--- LSP character offset of byte column `byte` (0-based) in `line`.
---@param line string
---@param byte integer
---@param encoding string 'utf-8'|'utf-16'|'utf-32'
---@return integer
function M.to_lsp(line, byte, encoding)
  byte = math.min(byte, #line)
  if encoding == 'utf-8' then
    return byte
  end
  if has_011 then
    return vim.str_utfindex(line, encoding, byte, false)
  end
  local u32, u16 = vim.str_utfindex(line, byte)
  return encoding == 'utf-16' and u16 or u32
end

--- Byte column of LSP character `character` in `line`.
---@param line string
---@param character integer
---@param encoding string
---@return integer
function M.to_byte(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  if has_011 then
    return vim.str_byteindex(line, encoding, character, false)
  end
  local ok, byte = pcall(vim.str_byteindex, line, character, encoding == 'utf-16')
  return ok and byte or #line
end

--- UTF-16 length of `text` (the unit of dgls/didPartiallyAcceptCompletion's acceptedLength).
---@param text string
---@return integer
function M.utf16_len(text)
  return M.to_lsp(text, #text, 'utf-16')
end

--- Text of line `row` (0-based) of `bufnr`.
---@param bufnr integer
---@param row integer
---@return string
function M.line(bufnr, row)
  return vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
end

--- An LSP position from a (0-based row, byte column) pair.
function M.lsp_position(bufnr, row, byte, encoding)
  return { line = row, character = M.to_lsp(M.line(bufnr, row), byte, encoding) }
end

--- (0-based row, byte column) from an LSP position.
function M.from_lsp(bufnr, position, encoding)
  return position.line, M.to_byte(M.line(bufnr, position.line), position.character, encoding)
end

return M
