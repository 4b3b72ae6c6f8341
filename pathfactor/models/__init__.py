"""Models on one face: ``fit`` / ``transform`` / ``write`` / ``save``; see ``base.LatentModel``."""
from .autoencoder import Autoencoder
from .base import REGISTRY, LatentModel, load
from .factor_analysis import FactorAnalysis
from .gmvae import GMVAE
from .nmf import NMF
from .pca import PCA
from .ppca import PPCA
from .slalom import Slalom
from .spex import Spex
from .supervised import Supervised
from .vae import VAE

__all__ = ["LatentModel", "Autoencoder", "PCA", "PPCA", "FactorAnalysis", "NMF", "Slalom", "Spex", "Supervised", "VAE", "GMVAE", "REGISTRY", "load"]
