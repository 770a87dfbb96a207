import torch
from mask2former.training.criterion import SetCriterion
from mask2former.training.matcher import HungarianMatcher
d='cuda'; B,Q,K=2,100,133
torch.manual_seed(0)
def pred(): return {"pred_logits":torch.randn(B,Q,K+1,device=d).requires_grad_(),"pred_masks":(3*torch.randn(B,Q,128,128,device=d)).requires_grad_()}
ps=[pred() for _ in range(10)]; out={**ps[-1],"aux_outputs":ps[:-1]}
t=[{"labels":torch.randint(0,K,(20,),device=d),"masks":torch.rand(20,512,512,device=d)>0.7} for _ in range(B)]
c=SetCriterion(K,HungarianMatcher())
g=torch.Generator(device=d)
g.manual_seed(0); ref=c(out,t,generator=g)
g.manual_seed(0)
with torch.autocast('cuda',dtype=torch.float16): am=c(out,t,generator=g)
print('autocast fp32-in max diff',max((ref[k]-am[k]).abs().item() for k in ref), {am[k].dtype for k in am})
half={"pred_logits":out["pred_logits"].half(),"pred_masks":out["pred_masks"].half(),"aux_outputs":[{k:v.half() for k,v in a.items()} for a in ps[:-1]]}
with torch.autocast('cuda',dtype=torch.float16): hl=c(half,t)
print('fp16-in dtypes',{hl[k].dtype for k in hl},'finite',all(torch.isfinite(v) for v in hl.values()))
SetCriterion.total_loss(hl).backward(); print('grad ok',out["pred_masks"].grad.abs().sum().item()>0)
g.manual_seed(0); again=c(out,t,generator=g); print('bit identical',all(torch.equal(ref[k],again[k]) for k in ref))
fm=HungarianMatcher(1,20,1,mask_cost="full"); fc=SetCriterion(K,fm,1,20,1,mask_loss="full")
gl=fc(out,t); cl=fc({"pred_logits":out["pred_logits"].cpu(),"pred_masks":out["pred_masks"].cpu(),"aux_outputs":[{k:v.cpu() for k,v in a.items()} for a in ps[:-1]]},[{k:v.cpu() for k,v in x.items()} for x in t])
print('full cuda vs cpu max rel',max(((gl[k].cpu()-cl[k]).abs()/cl[k].abs()).item() for k in gl))
