"""Mixture search: proxy swarms (many small models in one compiled step), RegMix regression and
data-mixing laws over their results, and the proposals they make."""
