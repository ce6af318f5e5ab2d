"""Models.  ``fastmod.train.registry`` maps the command-line names
(``lstm``, ``cnn-lstm``, ``qgmrn-brn``, ...) to builders here.  Every model is called as
``model(question [B,T], question_len [B], visual [B,C,H,W])`` and returns
answer logits [B, A] (or ``(logits, aux_loss)``)."""
from fastmod.models.baselines import CnnLstmModel, LstmEncoder, LstmModel
from fastmod.models.lnmn import LNMN, lnmn_scheme
from fastmod.models.qgmrn import QGMRN, GruEncoder

__all__ = ["LstmModel", "CnnLstmModel", "LstmEncoder", "LNMN", "lnmn_scheme", "QGMRN", "GruEncoder"]
