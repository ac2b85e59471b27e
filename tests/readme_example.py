import torch
from torch.utils.data import TensorDataset
from dlatent.models.dvae import dvae_mlp
from dlatent.models.base import GenerativeModel
from dlatent.metrics.classes import DCI
from dlatent.train import TrainConfig, fit

y = torch.randint(0, 3, (3000,))                                   # your own data: 2-D points of three classes
x = 0.4 * torch.randn(3000, 2) + torch.tensor([[0., 2.], [-2., -1.], [2., -1.]])[y]
model = dvae_mlp(x_dim=2, n_classes=3)                             # paper 1's DVAE with its toy networks
fit(model, TensorDataset(x, y), TrainConfig(steps=200, batch_size=128, progress=False))
points = model.sample(300, labels=torch.arange(3).repeat(100))     # 100 new points of each class
dci = DCI()                                                        # a torchmetrics metric: update it in your own loop
for i, (xb, yb) in enumerate(zip(x.split(500), y.split(500))):
    dci.update(model.representation(xb), yb, split='train' if i < 4 else 'test')
print('class read from the label code z_s:', round(dci.compute()['informativeness_test'], 3))
model.save_pretrained('my-dvae')                                   # config.json, model.safetensors, README.md
same = GenerativeModel.from_pretrained('my-dvae')                  # or model.push_to_hub('user/my-dvae') and load that
seed = lambda: torch.Generator().manual_seed(0)
assert torch.equal(same.sample(8, generator=seed()), model.sample(8, generator=seed()))
