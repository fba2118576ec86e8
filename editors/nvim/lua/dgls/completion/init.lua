--- dgls.completion: inline suggestions (ghost text) and their keymaps.
---
--- One set of actions (accept, accept_word, accept_line, next, prev, dismiss) over two backends:
---   native   - Neovim >= 0.12: vim.lsp.inline_completion (dgls.completion.native)
---   extmarks - Neovim 0.10/0.11, or inline.backend = 'extmarks': drawn by dgls (dgls.completion.extmarks)
--- Knows nothing about how the server is started (dgls.init) or about selection commands (dgls.commands).

local config = require('dgls.config')
local shared = require('dgls.completion.shared')

local api = vim.api
local M = {}

M.take_word = shared.take_word
M.take_line = shared.take_line

--- 'native' or 'extmarks': inline.backend, where 'auto' means native when vim.lsp.inline_completion exists.
---@return string
function M.backend()
  local backend = config.options.inline.backend
  if backend == 'auto' then
    return (vim.fn.has('nvim-0.12') == 1 and vim.lsp.inline_completion ~= nil) and 'native' or 'extmarks'
  end
  return backend
end

local function impl()
  return require('dgls.completion.' .. (M.backend() == 'native' and 'native' or 'extmarks'))
end

--- Called from the client's on_attach.
function M.attach(client, bufnr)
  if config.options.inline.enabled then
    impl().attach(client, bufnr)
  end
end

function M.accept() return impl().accept() end
function M.accept_word() return impl().accept_word() end
function M.accept_line() return impl().accept_line() end
function M.next() return impl().next() end
function M.prev() return impl().prev() end
function M.dismiss() return impl().dismiss() end
--- Whether a suggestion is drawn in the current buffer.
function M.visible() return impl().visible() end
--- Whether a dgls client with inline completion serves the current buffer.
function M.attached() return impl().attached(api.nvim_get_current_buf()) end

--- Insert-mode keymaps. Accept and dismiss fall back to the key itself when no suggestion is drawn;
--- next/prev when no dgls client is attached. The action runs scheduled (expr mappings may not edit text).
function M.setup()
  local keymaps = config.options.keymaps
  local actions = {
    accept = { M.accept, M.visible, 'Accept the suggestion' },
    accept_word = { M.accept_word, M.visible, 'Accept the next word of the suggestion' },
    accept_line = { M.accept_line, M.visible, 'Accept the next line of the suggestion' },
    next = { M.next, M.attached, 'Next suggestion candidate' },
    prev = { M.prev, M.attached, 'Previous suggestion candidate' },
    dismiss = { M.dismiss, M.visible, 'Dismiss the suggestion' },
  }
  for name, action in pairs(actions) do
    local lhs = keymaps[name]
    if lhs then
      vim.keymap.set('i', lhs, function()
        if action[2]() then
          vim.schedule(action[1])
          return ''
        end
        return vim.api.nvim_replace_termcodes(lhs, true, true, true)
      end, { expr = true, replace_keycodes = false, silent = true, desc = '[dgls] ' .. action[3] })
    end
  end
end

return M
