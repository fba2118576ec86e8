--- dgls.completion.shared: what both ghost-text backends need: splitting a suggestion into a word or a line,
--- the part of an item still ahead of the cursor, inserting text at the cursor, and telling the server what was
--- shown and partly taken. Knows nothing about how ghost text is drawn.

local position = require('dgls.position')

local api = vim.api
local M = {}

M.TRIGGER_INVOKED, M.TRIGGER_AUTOMATIC = 1, 2


--- The next word of `ghost`: leading whitespace (newlines too), then a run of word or of other characters.
---@param ghost string
---@return string
function M.take_word(ghost)
  local space = ghost:match('^%s*')
  local rest = ghost:sub(#space + 1)
  return space .. (rest:match('^[%w_]+') or rest:match('^[^%w_%s]+') or '')
end

--- The rest of the current line of `ghost`, or the next line when `ghost` starts with a line break.
---@param ghost string
---@return string
function M.take_line(ghost)
  if ghost:sub(1, 1) == '\n' then
    return '\n' .. (ghost:sub(2):match('^[^\n]*'))
  end
  return ghost:match('^[^\n]*')
end


function M.item_text(insert_text)
  return type(insert_text) == 'table' and insert_text.value or insert_text or ''
end

--- What the item adds after the cursor: its text minus what is already typed between its start and the cursor.
--- `start_row`/`start_col` (bytes) is where the item's text begins; nil means the cursor.
---@return string? ghost nil when the typed text no longer matches the item
function M.ghost_after_cursor(bufnr, text, start_row, start_col)
  local win = vim.fn.bufwinid(bufnr)
  local cursor = api.nvim_win_get_cursor(win ~= -1 and win or 0)
  local row, col = cursor[1] - 1, cursor[2]
  if start_row == nil or start_row ~= row or start_col > col then
    return start_row == nil and text or nil
  end
  local typed = position.line(bufnr, row):sub(start_col + 1, col)
  if text:sub(1, #typed) ~= typed then
    return nil
  end
  return text:sub(#typed + 1)
end

--- Insert `text` at the cursor and put the cursor after it.
function M.insert_at_cursor(bufnr, text)
  local cursor = api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local lines = vim.split(text, '\n', { plain = true })
  api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
end

function M.notify_server(bufnr, method, params)
  local dgls = require('dgls')
  local client = dgls.client(bufnr)
  if client then
    dgls.send_notification(client, method, params)
  end
end

--- Accept the first `take(ghost)` of an item and tell the server how much of it was taken.
---@param lsp_item table the item as the server sent it (for the notification)
---@return boolean
function M.accept_part(bufnr, lsp_item, ghost, take)
  local part = take(ghost)
  if part == '' then
    return false
  end
  local full = M.item_text(lsp_item.insertText)
  local typed_len = #full - #ghost
  M.insert_at_cursor(bufnr, part)
  M.notify_server(bufnr, 'dgls/didPartiallyAcceptCompletion', {
    item = lsp_item,
    acceptedLength = position.utf16_len(full:sub(1, typed_len + #part)),
  })
  return true
end

return M
