-- dgls: commands are available at once; the server starts after require('dgls').setup().
if vim.g.loaded_dgls then
  return
end
vim.g.loaded_dgls = true
if vim.fn.has('nvim-0.10') ~= 1 then
  vim.notify('[dgls] needs Neovim 0.10 or newer', vim.log.levels.ERROR)
  return
end
require('dgls.commands').register()
